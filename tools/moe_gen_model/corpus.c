/* The embedded training corpus of moe-gen-model's BPE trainer: varied on purpose (prose, code,
 * CJK and other scripts, emoji, numbers, whitespace runs, CRLF) so the learned merges look like a
 * real tokenizer's. Written for this project; one C string per document. */
#include "tools/moe_gen_model/gen_model.h"

static const char *const g_corpus[] = {
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away into the "
    "forest.",
    "It's a truth universally acknowledged that they'll say we've done what I'd have done, and "
    "you're right to doubt it.",
    "Mixture-of-Experts models route each token to a few experts chosen by a small gating "
    "network. Only the chosen experts run, so a model with many parameters costs little to "
    "evaluate per token. The router's scores are turned into weights with a softmax, the top "
    "few are kept, and their outputs are mixed.",
    "A serving cluster splits the prompt phase from the decode phase so that they stop "
    "interfering with each other. Prefill is compute bound: it processes hundreds of tokens at "
    "once. Decode is memory bound: each step reads every weight to produce a single token per "
    "sequence. Putting both on the same machine makes the short decode steps wait behind long "
    "prefills.",
    "Once upon a time, in a land far away, there lived a king who loved numbers and riddles. "
    "Every morning he asked his counsellors a new question, and every evening he wrote the "
    "best answers in a large green book. One day a young girl from the mountains came to the "
    "palace with a riddle of her own.",
    "She said: \"Hello, world!\" and he answered (quietly): 'good morning, everyone...' Then "
    "they both laughed, because nobody else was awake yet.",
    "Prices rose 3.5% in 2023, from $1,299.99 to $1,345.50; volume was 12,345,678 units. In "
    "2024 the index fell by 0.7% to 4,512.25 points, while the ratio stayed near 1:3.",
    "Call 555-0199 or write to info@example.com before 2024-12-31 23:59:59 UTC. Our office is "
    "open Monday to Friday, 09:00-17:30, except on public holidays.",
    "The years 1066, 1492, 1776, 1914, 1945 and 1969 appear in many history books. The "
    "twentieth century began on 1 January 1901 and ended on 31 December 2000.",
    "def fibonacci(n):\n"
    "    if n < 2:\n"
    "        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n"
    "\n"
    "\n"
    "def main():\n"
    "    for i in range(10):\n"
    "        print(f\"fib({i}) = {fibonacci(i)}\")\n"
    "\n"
    "\n"
    "if __name__ == \"__main__\":\n"
    "    main()",
    "for (int i = 0; i < n; ++i) {\n"
    "\tsum += a[i] * b[i];\n"
    "\tif (sum > limit)\n"
    "\t\tbreak;\n"
    "}",
    "class Expert:\n"
    "    def __init__(self, d_model, d_ff):\n"
    "        self.w1 = Linear(d_model, d_ff)\n"
    "        self.w2 = Linear(d_ff, d_model)\n"
    "        self.w3 = Linear(d_model, d_ff)\n"
    "\n"
    "    def forward(self, x):\n"
    "        return self.w2(silu(self.w1(x)) * self.w3(x))",
    "#include <stdio.h>\n"
    "#include <stdlib.h>\n"
    "\n"
    "int main(int argc, char **argv)\n"
    "{\n"
    "    if (argc < 2) {\n"
    "        fprintf(stderr, \"usage: %s FILE\\n\", argv[0]);\n"
    "        return 1;\n"
    "    }\n"
    "    FILE *f = fopen(argv[1], \"rb\");\n"
    "    if (!f) {\n"
    "        perror(argv[1]);\n"
    "        return 1;\n"
    "    }\n"
    "    long count = 0;\n"
    "    int c;\n"
    "    while ((c = fgetc(f)) != EOF)\n"
    "        count += c == '\\n';\n"
    "    fclose(f);\n"
    "    printf(\"%ld lines\\n\", count);\n"
    "    return 0;\n"
    "}",
    "SELECT name, count(*) AS n FROM users WHERE age >= 18 AND country = 'NO' GROUP BY name "
    "ORDER BY n DESC LIMIT 10;\n"
    "INSERT INTO orders (id, user_id, total) VALUES (1, 42, 19.99), (2, 7, 5.00);",
    "if x == y and not z:\n"
    "        print('equal')\n"
    "    else:\n"
    "        print(\"different\")",
    "function debounce(fn, ms) {\n"
    "  let timer = null;\n"
    "  return (...args) => {\n"
    "    clearTimeout(timer);\n"
    "    timer = setTimeout(() => fn.apply(this, args), ms);\n"
    "  };\n"
    "}\n"
    "\n"
    "const sum = [1, 2, 3, 4].reduce((acc, x) => acc + x, 0);\n"
    "console.log(`sum is ${sum}`);",
    "fn main() {\n"
    "    let words = vec![\"alpha\", \"beta\", \"gamma\"];\n"
    "    for (i, w) in words.iter().enumerate() {\n"
    "        println!(\"{}: {}\", i, w.to_uppercase());\n"
    "    }\n"
    "    let total: u64 = (1..=100).sum();\n"
    "    assert_eq!(total, 5050);\n"
    "}",
    "#!/bin/sh\n"
    "set -eu\n"
    "for f in *.txt; do\n"
    "    wc -l \"$f\"\n"
    "done\n"
    "grep -rn \"TODO\" src/ | sort | uniq -c > todo.log\n"
    "echo \"done: $(date +%Y-%m-%d)\"",
    "<!DOCTYPE html>\n"
    "<html lang=\"en\">\n"
    "<head><meta charset=\"utf-8\"><title>Experts</title></head>\n"
    "<body>\n"
    "  <h1>Hello</h1>\n"
    "  <p class=\"note\">A <b>bold</b> claim &amp; a <i>quiet</i> answer.</p>\n"
    "</body>\n"
    "</html>",
    "# Installing\n"
    "\n"
    "1. Install the dependencies: `apt-get install cmake ninja-build`.\n"
    "2. Configure: `cmake -S . -B build -G Ninja`.\n"
    "3. Build: `cmake --build build -j2`.\n"
    "\n"
    "> Note: the tests take about a minute.\n"
    "\n"
    "- item one\n"
    "- item two\n"
    "  - nested item",
    "JSON: {\"id\": 17, \"name\": \"expert_3\", \"weights\": [0.25, -1.5e-3, 7], \"active\": "
    "true, \"parent\": null}",
    "{\n"
    "  \"model_type\": \"mixtral\",\n"
    "  \"hidden_size\": 4096,\n"
    "  \"num_local_experts\": 8,\n"
    "  \"num_experts_per_tok\": 2,\n"
    "  \"rope_theta\": 1000000.0\n"
    "}",
    "    indented with four spaces\n"
    "        and eight\n"
    "\t\ttwo tabs\n"
    "\n"
    "\n"
    "three newlines",
    "many     spaces   between    words and trailing spaces   \n"
    "   leading spaces and\ta\ttab",
    "line one\n"
    "line two\n"
    "\n"
    "line four after a blank line",
    "Windows line endings look like this.\r\n"
    "Each line ends with a carriage return.\r\n",
    "机器学习是人工智能的一个分支。深度学习使用多层神经网络。专家混合模型把每个词元交给少数几个专家"
    "处理，所以计算量比参数量小得多。",
    "今天天气很好，我们去公园散步吧。明天可能会下雨，记得带伞。这个周末我们打算去看电影，你要一起来"
    "吗？",
    "中文文本里也有数字：二〇二四年，第3章，共128页，价格是45.5元。",
    "東京は日本の首都です。ひらがなとカタカナと漢字を使います。今日はいい天気ですね。私は毎朝コーヒ"
    "ーを飲みます。",
    "このモデルは専門家の混合を使っています。トークンごとに二人の専門家が選ばれます。",
    "한국어 문장도 조금 넣어 봅니다. 안녕하세요, 반갑습니다! 오늘은 날씨가 좋네요. 저는 서울에 "
    "살고 있습니다.",
    "Emoji: 😀 😃 😄 😁 🎉 🚀 ❤️ 👍 👍🏽 🇫🇷 🇯🇵 and more 🙂. Weather today: ☀️ then 🌧️, maybe "
    "⛈️ tonight. "
    "Food: 🍕🍣🍜☕.",
    "Café, naïve, résumé, jalapeño, São Paulo, Zürich, Kraków, Ångström, façade, coöperate, "
    "Smørrebrød, Øresund.",
    "Ελληνικά: Καλημέρα κόσμε. Русский: Привет, мир! Как дела? Українська: Добрий день. "
    "Polski: Dzień dobry, jak się masz?",
    "العربية: مرحبا بالعالم. עברית: שלום עולם. हिन्दी: नमस्ते दुनिया। ไทย: สวัสดีครับ",
    "Tabs\tseparate\tcolumns\tin\tTSV\tfiles\n"
    "1\t2\t3\t4\n"
    "alpha\tbeta\tgamma\tdelta",
    "Math: x^2 + y^2 = z^2, e^(i*pi) + 1 = 0, sum_{k=1}^{n} k = n(n+1)/2, pi = 3.14159265, "
    "sqrt(2) = 1.41421356. Also ∑, ∫, ≤, ≥, ≠, ∞, α, β and γ.",
    "URLs like https://example.org/path?q=mixture&lang=en#top and "
    "http://localhost:8080/v1/models are common in web text.",
    "I'M SHOUTING, YOU'RE LISTENING, WE'VE HEARD, THEY'LL KNOW, HE'D SAY, IT'S DONE.",
    "lowercase words follow uppercase WORDS and MiXeD CaSe Words in the same line; "
    "CamelCaseIdentifiers and snake_case_names and kebab-case-names too.",
    "The expert parallel all-to-all exchange dispatches tokens and combines their outputs. "
    "Every rank of an expert-parallel group steps together, even when it has nothing to "
    "compute, because the exchange is collective.",
    "Numbers again: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 32 64 100 128 256 512 1000 1024 "
    "2048 4096 10000 65536 3.0 2.5 -7 +8 1e10 0.001 0x1F 0b1010.",
    "Punctuation!!! Really?\?\? Yes... No--maybe; (perhaps) [certainly] {never} <always> "
    "\"quoted\" 'single' `backtick` a/b a\\b a|b a_b a-b a+b a=b a~b a@b a#b a$b a%b a^b a&b "
    "a*b.",
    "The history of computing is full of small ideas that turned out to matter. Someone "
    "noticed that most of a program's time is spent in a few loops, so they made those loops "
    "fast. Someone else noticed that memory was slow and caches were small, so they kept the "
    "data that was used together close together. Neither idea is clever on its own, but "
    "together they explain why a careful program can run a hundred times faster than a "
    "careless one.",
    "When the sun went down, the market slowly emptied. The fishmongers packed their ice, the "
    "bakers counted the loaves they had not sold, and the children chased each other between "
    "the empty stalls. An old man stayed on the bench by the fountain, feeding the pigeons "
    "crumbs from a paper bag, as he did every evening.",
    "Good documentation answers three questions: what does this do, how do I use it, and what "
    "happens when it fails? A reader who finds the answer to the third question will trust the "
    "first two.",
    "The recipe is simple. Mix 250 g of flour, 2 eggs, 500 ml of milk and a pinch of salt. Let "
    "the batter rest for 30 minutes. Heat a pan, add a little butter, pour a thin layer of "
    "batter and cook each side for about a minute.",
    "Weather report: cloudy in the north with temperatures between 4 and 9 degrees; sunny "
    "spells in the south, up to 17 degrees. Winds from the west at 20 km/h, gusting to 45 km/h "
    "on the coast.",
    "Q: What is the capital of France?\n"
    "A: Paris.\n"
    "Q: How many legs does a spider have?\n"
    "A: Eight.\n"
    "Q: What is 12 times 12?\n"
    "A: 144.",
    "<|user|> Can you summarise the article in two sentences?\n"
    "<|assistant|> The article argues that smaller models served efficiently can beat larger "
    "ones on cost. It supports the claim with benchmarks on three workloads.",
    "Dear Ms. Olsen,\n"
    "\n"
    "Thank you for your letter of 3 March. We have received your order no. 2024-0117 and will "
    "ship it within five working days.\n"
    "\n"
    "Kind regards,\n"
    "The Support Team",
    "Error: cannot open file 'data/train.bin' (No such file or directory)\n"
    "Warning: 3 tensors were not used: lm_head.bias, model.rotary.inv_freq, model.norm.bias\n"
    "INFO 2024-05-02 10:15:01,223 worker.py:88] loaded 48 layers in 12.7s",
    "    return x if x > 0 else -x  # absolute value, written the long way",
    "The model reads the text one token at a time. Each token is a piece of a word, a whole "
    "word, a number, a space, or a symbol. Common words become single tokens; rare words are "
    "split into several pieces. That is why a tokenizer trained on English handles English "
    "cheaply and other languages less so.",
    "A long sentence with many commas, semicolons; colons: dashes - and parentheses (which, as "
    "you can see, nest (sometimes) quite deeply) tests whether the splitter keeps punctuation "
    "apart from the words around it.",
    "The train leaves at 7:45 from platform 9, arrives at 11:20, and costs 39 euros (or 29 "
    "with a discount card). Tickets: "
    "https://tickets.example.net/booking?from=OSL&to=BGO&date=2025-06-01.",
    "README:\n"
    "  --help         show this help and exit\n"
    "  --verbose, -v  print more\n"
    "  --out DIR      write the results to DIR (default: ./out)\n"
    "  --seed N       random seed (default 0)",
    "x = [i * i for i in range(20) if i % 3 == 0]\n"
    "d = {k: v for k, v in zip(\"abc\", (1, 2, 3))}\n"
    "print(sorted(d.items(), key=lambda kv: -kv[1]))",
    "struct node { int key; struct node *left, *right; };\n"
    "\n"
    "static struct node *insert(struct node *t, struct node *n)\n"
    "{\n"
    "    if (!t)\n"
    "        return n;\n"
    "    if (n->key < t->key)\n"
    "        t->left = insert(t->left, n);\n"
    "    else\n"
    "        t->right = insert(t->right, n);\n"
    "    return t;\n"
    "}",
    "The end.",
    "Whitespace at the end\n",
    "   ",
    "\n"
    "\n"
    "\t\t\t    \n",
    "Memory bandwidth decides how fast a language model can generate text. To produce one "
    "token, every active weight has to travel from memory to the processor at least once. A "
    "model with seven billion parameters in sixteen-bit floats moves fourteen gigabytes per "
    "token; at a few hundred gigabytes per second that is a few dozen tokens per second, no "
    "matter how many arithmetic units are waiting. Batching helps because one pass over the "
    "weights serves every sequence in the batch.",
    "The lighthouse keeper wrote in his log every night. Most entries were short: the weather, "
    "the ships that passed, the oil he had used. But on the night of the great storm he filled "
    "three pages. The waves, he wrote, were higher than the lantern, and the whole tower "
    "hummed like a bell. In the morning the sea was calm and grey, and a single gull sat on "
    "the railing as if nothing had happened.",
    "Rules of thumb for reviewing code: read the tests first, because they tell you what the "
    "author believed the code should do. Then read the error paths, because that is where the "
    "bugs live. Finally read the happy path, which is usually fine.",
    "In the spring the river rises and floods the low meadows. Farmers move their cattle to "
    "the hills and wait. When the water goes down it leaves a layer of dark mud, and that mud "
    "is why the valley grows the best wheat in the region.",
    "Step 1: open the box. Step 2: check that all 12 parts are there (A-L). Step 3: attach "
    "part B to part A with the four short screws. Step 4: do not over-tighten! Step 5: repeat "
    "for parts C through F.",
    "import numpy as np\n"
    "\n"
    "def softmax(x, axis=-1):\n"
    "    x = x - x.max(axis=axis, keepdims=True)\n"
    "    e = np.exp(x)\n"
    "    return e / e.sum(axis=axis, keepdims=True)\n"
    "\n"
    "logits = np.array([[2.0, 1.0, 0.1], [0.5, 0.5, 3.0]])\n"
    "probs = softmax(logits)\n"
    "top = probs.argsort(axis=-1)[:, ::-1][:, :2]\n"
    "print(probs.round(3), top)",
    "package main\n"
    "\n"
    "import (\n"
    "\t\"fmt\"\n"
    "\t\"strings\"\n"
    ")\n"
    "\n"
    "func main() {\n"
    "\tparts := strings.Split(\"a,b,c\", \",\")\n"
    "\tfor i, p := range parts {\n"
    "\t\tfmt.Printf(\"%d=%s\\n\", i, p)\n"
    "\t}\n"
    "}",
    "public class Hello {\n"
    "    public static void main(String[] args) {\n"
    "        int[] xs = {3, 1, 4, 1, 5, 9, 2, 6};\n"
    "        java.util.Arrays.sort(xs);\n"
    "        System.out.println(java.util.Arrays.toString(xs));\n"
    "    }\n"
    "}",
    "CREATE TABLE experts (\n"
    "    layer INTEGER NOT NULL,\n"
    "    expert INTEGER NOT NULL,\n"
    "    tokens BIGINT DEFAULT 0,\n"
    "    PRIMARY KEY (layer, expert)\n"
    ");\n"
    "UPDATE experts SET tokens = tokens + 1 WHERE layer = 3 AND expert = 17;",
    "apiVersion: v1\n"
    "kind: Service\n"
    "metadata:\n"
    "  name: moe-serve\n"
    "spec:\n"
    "  ports:\n"
    "    - port: 50051\n"
    "      targetPort: grpc",
    "diff --git a/src/main.c b/src/main.c\n"
    "@@ -10,7 +10,7 @@ int main(void)\n"
    "-    int n = 10;\n"
    "+    int n = 20;\n"
    "     return run(n);",
    "[2025-01-14 08:00:01] GET /api/v1/status 200 3ms\n"
    "[2025-01-14 08:00:02] POST /api/v1/generate 200 412ms tokens=128\n"
    "[2025-01-14 08:00:05] POST /api/v1/generate 429 1ms \"queue full\"",
    "Temperature 0.7, top_p 0.9, top_k 40, max_tokens 256, repetition_penalty 1.1, seed 1234.",
    "自然语言处理让计算机理解人类的语言。分词是第一步：把一句话切成更小的单位。常见的词变成一个词元"
    "，少见的词被拆成几个部分。",
    "春天来了，花开了，鸟儿在树上唱歌。孩子们在草地上跑来跑去，老人们坐在长椅上聊天。",
    "北京、上海、广州和深圳是中国最大的城市。长江是中国最长的河流，全长约六千三百公里。",
    "日本語の文章：明日は雨が降るそうです。図書館で本を三冊借りました。駅まで歩いて十分かかります"
    "。",
    "서울은 한국의 수도입니다. 한글은 세종대왕이 만들었습니다. 감사합니다!",
    "Deutsch: Die Straße ist nass, weil es geregnet hat. Français : Où est la gare ? Español: "
    "¿Dónde está la biblioteca? ¡Qué bien! Italiano: Perché no? Português: Não sei, obrigado. "
    "Türkçe: Günaydın, nasılsın? Tiếng Việt: Xin chào.",
    "Smileys and symbols: ✅ ❌ ⚠️ ✨ 🔥 💡 📦 🧪 🐍 🦀 🐧 ↑ ↓ ← → ★ ☆ © ® ™ § ¶ € £ ¥ ° ± × "
    "÷.",
    "Box drawing: ┌──┬──┐ │a │b │ ├──┼──┤ └──┴──┘ and arrows ⇒ ⇐ ⇔.",
    "1. First item\n"
    "2. Second item\n"
    "10. Tenth item\n"
    "100. Hundredth item\n"
    "3.14 is not a list item, and neither is 2024.",
    "Phone numbers: +47 22 12 34 56, (555) 123-4567, 0800 123 456. Postal codes: 0150, 90210, "
    "SW1A 1AA.",
    "Version numbers: v1.0.0, 2.7.18, 3.11.7, 5.24.0-rc1, 0.23.3; build 20240517.4; commit "
    "4f45093.",
    "The cat sat on the mat. The mat was red. The cat was black. The cat liked the red mat and "
    "the mat liked the black cat.",
    "He opened the door, looked at the rain, and closed it again. \"Not today,\" he said. "
    "\"Tomorrow, maybe.\" She smiled and put the kettle on.",
    "Three rules for a server: never crash on bad input, always say why you refused, and free "
    "what you took.",
    "An expert that nobody picks still costs memory. An expert that everybody picks becomes a "
    "bottleneck. Load balancing losses during training push the router towards a fair share, "
    "and at serving time hot experts can be replicated across ranks.",
    "The tokenizer splits \"unbelievable\" into \"un\", \"believ\" and \"able\", and "
    "\"tokenization\" into \"token\" and \"ization\". Numbers are split digit by digit: 2024 "
    "becomes 2, 0, 2, 4.",
    "Hash tables, heaps, tries, queues, stacks, lists, trees and graphs: the usual suspects. "
    "Sorting is O(n log n), lookups in a hash table are O(1) on average, and a binary search "
    "needs about log2(n) comparisons.",
    "Recursion: a function that calls itself. Iteration: a loop that repeats. Every recursive "
    "function can be written as a loop with an explicit stack, and the loop is usually faster.",
    "It was the coldest winter anyone could remember. The lake froze so thick that the whole "
    "village walked across it to the church on the other side, and the priest held the "
    "Christmas service with his coat on.",
    "Please reply by Friday. If you can't make it, let us know and we'll find another date. "
    "Thanks!",
    "TODO: handle the empty case.\n"
    "FIXME: this breaks when n == 0.\n"
    "NOTE: the buffer is owned by the caller.",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z\n"
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z\n"
    "0123456789 !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~\n",
};

int moe_gen_corpus_count(void)
{
    return (int)(sizeof g_corpus / sizeof g_corpus[0]);
}

const char *moe_gen_corpus_doc(int i)
{
    return i >= 0 && i < moe_gen_corpus_count() ? g_corpus[i] : NULL;
}
