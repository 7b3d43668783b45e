#!/usr/bin/env python3
"""Our Jinja engine (common/jinja*.c, through moe-chat-template) against Python jinja2, byte for byte.

Renders the supported families' real chat templates (tests/reference/chat_templates/, sources in
its README) and a set of templates exercising each construct over many message lists with both
engines, and compares: identical text, or both raising (jinja2's message inside ours). jinja2 is
configured exactly as transformers' apply_chat_template configures it
(transformers/utils/chat_template_utils.py: ImmutableSandboxedEnvironment with trim_blocks,
lstrip_blocks and loopcontrols, a tojson keeping non-ASCII and key order, raise_exception).

Usage: chat_template_test.py PATH/TO/moe-chat-template [PATH/TO/moe-gen-model]
With moe-gen-model it also checks that a generated model of each architecture carries exactly
its family's template, and renders through the model directory (its bos/eos) with both engines.
Exit status 0 when all agree.
"""
import itertools
import json
import os
import subprocess
import sys
import tempfile

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = os.path.join(HERE, "chat_templates")


def transformers_env():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def message_lists():
    """Conversations: the shapes chat clients send, including ones templates refuse."""
    S = {"role": "system", "content": "You are terse. Answer in one line."}
    U = lambda t: {"role": "user", "content": t}
    A = lambda t: {"role": "assistant", "content": t}
    texts = ["Hello!", "  spaced  out \n", "Ünïcödé — 日本語 🚀", "quote ' and \" and \\ back",
             "multi\nline\n\ntext", "", "<tool_response>42</tool_response>", "a{{b}}c{%d%}"]
    lists = []
    for t in texts:
        lists.append([U(t)])
        lists.append([S, U(t)])
    lists += [
        [U("Hi"), A("Hello, how can I help?"), U("Tell me a joke.")],
        [S, U("Hi"), A("Hello."), U("2+2?"), A("4"), U("And 3+3?")],
        [U("Hi"), A("Hello.")],
        [S, U("q1"), A("a1"), U("q2"), A("a2")],
        [U("x"), U("y")],                                   # Mixtral refuses: not alternating
        [A("I start")],                                     # Mixtral refuses
        [S, S, U("two systems")],
        [U("think"), A("<think>\nreasoning here\n</think>\n\nThe answer.")],
        [U("think"), A("<think>r1</think>a1"), U("again"), A("<think>\nr2\n</think>\na2")],
        [U("q"), {"role": "assistant", "content": "a", "reasoning_content": "because"}],
        [U("q"), {"role": "assistant", "content": "a", "reasoning_content": None}],
        [U("weather?"),
         {"role": "assistant", "content": "",
          "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                           "arguments": {"city": "Paris", "unit": "c"}}}]},
         {"role": "tool", "content": "{\"temp\": 21}"},
         {"role": "tool", "content": "sunny"},
         U("thanks")],
        [U("call"),
         {"role": "assistant", "content": "calling",
          "tool_calls": [{"function": {"name": "f", "arguments": "{\"a\": 1}"}},
                         {"function": {"name": "g", "arguments": {"b": [1, 2.5, None, True]}}}]}],
        [{"role": "tool", "content": "orphan tool result"}],
        [{"role": "developer", "content": "unknown role"}],
        [U("<tool_response>x</tool_response>"), A("ok"), U("<tool_response>y</tool_response>")],
    ]
    return lists


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather — now",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}]

FAMILY_TOKENS = {
    "mixtral.jinja": {"bos_token": "<s>", "eos_token": "</s>"},
    "qwen2_moe.jinja": {"eos_token": "<|im_end|>"},
    "olmoe.jinja": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
    "qwen3_moe.jinja": {"eos_token": "<|im_end|>"},
}

# Templates exercising constructs beyond the four above (each rendered over every message list).
CONSTRUCTS = {
    "filters": "{% for m in messages %}{{ m.content|trim|upper }}|{{ m.content|length }}|"
               "{{ m.role|capitalize }}|{{ m.content|replace('e', 'E') }}|{{ m|tojson }}|"
               "{{ m.content|lower|title }}|{{ m.missing|default('dflt') }}|"
               "{{ m.content|default('empty', true) }}\n{% endfor %}",
    "tests": "{% for m in messages %}{{ m.content is string }}{{ m.tool_calls is defined }}"
             "{{ m.reasoning_content is none }}{{ loop.index is odd }}{{ loop.index0 is even }}"
             "{{ m is mapping }}{{ m.content is not number }}{{ 3 is divisibleby 3 }}"
             "{{ m.role is in ['user', 'assistant'] }}{{ m.role is eq 'user' }}{% endfor %}",
    "loop": "{% for m in messages %}{{ loop.index }}/{{ loop.length }} {{ loop.revindex }} "
            "{{ loop.first }} {{ loop.last }} {{ loop.previtem.role if loop.previtem is defined else '-' }}"
            " {{ loop.nextitem.role if loop.nextitem is defined else '-' }}\n{% else %}none{% endfor %}",
    "loopctl": "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
               "{{ m.role }};{% if loop.index > 3 %}{% break %}{% endif %}{% endfor %}",
    "loopfilter": "{% for m in messages if m.role != 'system' %}{{ loop.index }}:{{ m.role }} {% endfor %}",
    "namespace": "{% set ns = namespace(n=0, roles='') %}{% for m in messages %}"
                 "{% set ns.n = ns.n + m.content|length %}{% set ns.roles = ns.roles ~ m.role[0] %}"
                 "{% endfor %}{{ ns.n }} {{ ns.roles }}",
    "scoping": "{% set x = 'outer' %}{% for m in messages %}{% set x = m.role %}{{ x }}{% endfor %}"
               "|{{ x }}{% if true %}{% set y = 'ify' %}{% endif %}|{{ y }}",
    "macro": "{% macro fmt(m, prefix='>', suffix='') %}{{ prefix }}{{ m.role }}: {{ m.content|trim }}"
             "{{ suffix }}{% endmacro %}{% for m in messages %}{{ fmt(m) }}\n{{ fmt(m, suffix='!', "
             "prefix='#') }}\n{% endfor %}",
    "slicing": "{{ messages[1:]|length }} {{ messages[-1].role }} {{ messages[::-1]|map(attribute='role')|join(',') }} "
               "{% for m in messages %}{{ m.content[:3] }}|{{ m.content[-2:] }}|{{ m.content[::2] }}|"
               "{{ m.content[1:-1] }}|{{ m.content[::-1] }}{% endfor %}",
    "methods": "{% for m in messages %}{{ m.content.strip() }}|{{ m.content.split() }}|"
               "{{ m.content.split('e') }}|{{ m.content.split('e', 1) }}|{{ m.content.rsplit('e', 1) }}|"
               "{{ m.content.startswith('H') }}|{{ m.content.endswith(('!', '\\n')) }}|"
               "{{ m.content.lstrip(' \\n') }}|{{ m.content.rstrip('t\\n ') }}|{{ m.content.find('e') }}|"
               "{{ m.content.count('e') }}|{{ m.content.replace('l', 'L', 1) }}|"
               "{{ m.get('role') }}|{{ m.get('nope', 'dflt') }}|{{ m.keys()|list }}|"
               "{{ '-'.join(['a', m.role]) }}\n{% endfor %}",
    "items": "{% for m in messages %}{% for k, v in m.items() %}{{ k }}={{ v }};{% endfor %}"
             "{% for k, v in m|items %}[{{ k }}]{% endfor %}\n{% endfor %}",
    "select": "{{ messages|selectattr('role', 'equalto', 'user')|map(attribute='content')|list }}"
              "{{ messages|rejectattr('role', 'eq', 'user')|list|length }}"
              "{{ messages|map(attribute='role')|unique|list }}{{ messages|map(attribute='role')|first }}"
              "{{ messages|map(attribute='role')|list|last }}{{ messages|selectattr('tool_calls')|list|length }}"
              "{{ [3, 1, 2]|sort }}{{ ['b', 'a']|sort(reverse=true) }}{{ messages|sort(attribute='role')|map(attribute='role')|join }}"
              "{{ [1, 2, 3]|select('odd')|list }}{{ [1, 2, 3]|reject('odd')|list }}{{ [1, 2.5]|sum }}"
              "{{ [4, 9, 2]|max }}{{ [4, 9, 2]|min }}{{ 'abc'|list }}{{ 'abc'|reverse }}",
    "operators": "{{ 1 + 2 * 3 }} {{ (1 + 2) * 3 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} "
                 "{{ 2 ** 10 }} {{ 7 / 2 }} {{ 1 / 3 }} {{ 0.1 + 0.2 }} {{ 1e20 }} {{ 1e-5 }} {{ 3 / 1 }} "
                 "{{ 'a' ~ 1 ~ none ~ true }} {{ 'ab' * 3 }} {{ [1] + [2] }} {{ 1 < 2 < 3 }} {{ 3 > 2 > 5 }} "
                 "{{ 'b' in 'abc' }} {{ 'x' not in ['x'] }} {{ not 0 }} {{ 0 or 'dflt' }} {{ 'a' and 'b' }} "
                 "{{ none }} {{ true }} {{ [1, 'a', none, false, 2.5] }} {{ {'k': 'v', 'n': 1} }} {{ (1,) }} "
                 "{{ (1, 2) }} {{ 'yes' if messages else 'no' }} {{ 'x' if false }}|{{ -3|abs }} {{ 2.567|round(2) }} "
                 "{{ '12'|int + 1 }} {{ 'x'|int }} {{ '2.5'|float }} {{ 10|string ~ 'x' }} {{ messages|count }}",
    # literals longer than any fixed buffer (fuzz_jinja found a 128-byte one overrun), underscores
    "numbers": "{{ 1_000 + 2_5 }} {{ 1_0.2_5e1_0 }} {{ 0.%s }} {{ %se-200 }} {{ %s1.5 }} "
               "{{ 1.%s1E+2 }} {{ 12345678901234567 }} {{ 0x1F + 0o17 + 0B_101 }} {{ 00 + 0_0 }} "
               "{{ 01.5 + 1e1_0 }} {{ messages.0.role }}" % ("1" * 300, "9" * 200, "0" * 150, "0" * 140),
    "leading_zero": "{{ 007 }}",
    "tojson": "{{ messages|tojson }}\n{{ messages|tojson(indent=2) }}\n{{ {'a': [1, {'b': none}], 'c': 'é\\t'}|tojson }}"
              "{{ tools|tojson if tools is defined else 'no tools' }}",
    "whitespace": "A  {%- if true %}  B  {% endif -%}  C\n  {% for m in messages %}\n    {{ m.role }}\n  {% endfor %}\n"
                  "{#- comment #}\n  D {# c2 #}\nE{%+ if true %}F{% endif +%}\nG\n    {{- ' H ' -}}\n  I\n",
    "setblock": "{% set body %}{% for m in messages %}<{{ m.role }}>{% endfor %}{% endset %}{{ body|length }}{{ body }}",
    "strings": "{{ 'it\\'s' }} {{ \"dq \\\"x\\\"\" }} {{ 'tab\\tnl\\n' }} {{ '\\u00e9\\x41' }} {{ 'adj' 'acent' }} "
               "{{ 'a,b,,c'.split(',') }} {{ ' x '.strip() }} {{ 'x'.upper() }}{{ 'ÉCOLE'.lower() }}",
    "raise": "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('tool messages are not supported: ' ~ m.content) }}{% endif %}{{ m.role }}{% endfor %}",
    "range": "{% for i in range(3) %}{{ i }}{% endfor %}{% for i in range(5, 1, -2) %}{{ i }}{% endfor %}{{ range(2)|list }}",
    "undefined_err": "{{ messages[0].nope.deeper }}",
    "dict_literal": "{% set d = {'user': 'U', 'assistant': 'A', 'system': 'S'} %}{% for m in messages %}{{ d[m.role] }}{{ d.get(m.role, '?') }}{% endfor %}",
}


def render_py(env, src, ctx):
    try:
        return {"ok": True, "text": env.from_string(src).render(**ctx)}
    except Exception as e:  # both engines must refuse the same inputs
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def check_generated_models(env, tool, gen_model):
    """moe-gen-model's tokenizer_config.json: the family's template, rendered through the model."""
    total = failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("mixtral", "qwen2_moe", "olmoe", "qwen3_moe"):
            d = os.path.join(tmp, arch)
            subprocess.run([gen_model, "--arch", arch, "--preset", "tiny", "--seed", "1", "--out", d],
                           check=True, capture_output=True)
            with open(os.path.join(d, "tokenizer_config.json"), encoding="utf-8") as f:
                cfg = json.load(f)
            with open(os.path.join(TEMPLATES, arch + ".jinja"), encoding="utf-8") as f:
                want_src = f.read()
            total += 1
            if cfg.get("chat_template") != want_src:
                failed += 1
                print(f"FAIL moe-gen-model --arch {arch}: chat_template differs from {arch}.jinja")
                continue
            tokens = {k: cfg[k] for k in ("bos_token", "eos_token") if isinstance(cfg.get(k), str)}
            msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Bye"}]
            mpath = os.path.join(tmp, "m.json")
            with open(mpath, "w", encoding="utf-8") as f:
                json.dump(msgs, f)
            got = subprocess.run([tool, "--model", d, mpath], capture_output=True, check=False)
            want = env.from_string(want_src).render(messages=msgs, add_generation_prompt=True, **tokens)
            total += 1
            if got.returncode != 0 or got.stdout.decode() != want:
                failed += 1
                print(f"FAIL --model {arch}: jinja2 {want!r} ours {got.stdout!r} {got.stderr!r}")
            else:
                print(f"ok   moe-gen-model --arch {arch}: its template, rendered through the model")
    return total, failed


def main():
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    tool = sys.argv[1]
    env = transformers_env()
    suites = []
    for name in sorted(os.listdir(TEMPLATES)):
        if not name.endswith(".jinja"):
            continue
        with open(os.path.join(TEMPLATES, name), encoding="utf-8") as f:
            src = f.read()
        cases = []
        for msgs, gen, tools, think in itertools.product(message_lists(), [True, False],
                                                         [None, TOOLS], [None, False, True]):
            ctx = dict(FAMILY_TOKENS[name], messages=msgs, add_generation_prompt=gen)
            if tools is not None:
                ctx["tools"] = tools
            if think is not None:
                ctx["enable_thinking"] = think
            cases.append(ctx)
        suites.append((name, src, cases))
    for name, src in CONSTRUCTS.items():
        cases = [dict(messages=m, add_generation_prompt=True) for m in message_lists() if m]
        cases.append(dict(messages=[{"role": "user", "content": "hi"}], tools=TOOLS))
        suites.append(("construct:" + name, src, cases))

    total = failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, src, cases in suites:
            tpath, cpath = os.path.join(tmp, "t.jinja"), os.path.join(tmp, "cases.json")
            with open(tpath, "w", encoding="utf-8") as f:
                f.write(src)
            with open(cpath, "w", encoding="utf-8") as f:
                json.dump(cases, f, ensure_ascii=False)
            out = subprocess.run([tool, "--template", tpath, "--cases", cpath],
                                 capture_output=True, check=False)
            if out.returncode != 0:
                print(f"FAIL {name}: moe-chat-template exited {out.returncode}: "
                      f"{out.stderr.decode(errors='replace')}")
                failed += len(cases)
                total += len(cases)
                continue
            ours = json.loads(out.stdout)
            bad = 0
            for ctx, got in zip(cases, ours):
                total += 1
                want = render_py(env, src, ctx)
                same = (want["ok"] and got["ok"] and want["text"] == got["text"]) or \
                       (not want["ok"] and not got["ok"])
                if want["ok"] is False and got["ok"] is False and "TemplateError" in want["error"]:
                    # raise_exception: our message carries the template's text
                    same = want["error"].split(": ", 1)[1] in got["error"]
                if not same:
                    bad += 1
                    if bad <= 3:
                        print(f"FAIL {name}: messages={json.dumps(ctx.get('messages'))[:300]}"
                              f" gen={ctx.get('add_generation_prompt')}\n  jinja2: {want!r:.600}\n"
                              f"  ours:   {got!r:.600}")
            failed += bad
            print(f"{'ok  ' if bad == 0 else 'FAIL'} {name}: {len(cases) - bad}/{len(cases)} agree")
    if len(sys.argv) == 3:
        t, f = check_generated_models(env, tool, sys.argv[2])
        total += t
        failed += f
    print(f"{total - failed} passed, {failed} failed (jinja2 {jinja2.__version__})")
    return 0 if failed == 0 and total > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
