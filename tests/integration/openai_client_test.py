"""The HTTP API against clients nobody here wrote: the official `openai` Python SDK and raw sockets.

Starts a cluster (1 prefill + 1 decode) on the built-in tiny model (build/models/tiny, which carries
Qwen3-MoE's real chat template) with --http-listen, then: completions and chat, streamed and not,
greedy text equal to moe-generate's (chat: on the prompt moe-chat-template renders), usage, stop,
echo (streamed and not; with logprobs refused), n > 1 (streamed and not, seeded choices as single requests with seed + i; over gRPC in one call,
each choice as moe-generate with seed + i),
seed, logprobs (completions and chat, streamed and not; the same numbers over gRPC), penalties
(over gRPC: the exact logit shift presence + frequency on the generated token), slow and unread
clients, errors raised as the SDK's own exception classes, NUL bytes refused on both APIs, a client that disconnects mid-stream
(its KV must come back), and bad HTTP (malformed JSON, wrong types, a huge body, HTTP/1.0,
pipelining, NUL escapes, unknown paths) each with its status while the server keeps serving.
Usage: MOE_BUILD_DIR=build python3 openai_client_test.py   (run.sh sets PYTHONPATH and the dir)
"""
import json
import math
import os
import re
import socket
import subprocess
import sys
import time

import openai

from cluster import Cluster, TestFailure, build_dir, check

PROMPT = "Hello there, experts"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]


def tiny_model():
    return os.path.join(build_dir(), "models", "tiny")


def moe_generate_text(model, prompt, max_new, extra=()):
    """moe-generate's greedy text (what it prints before its ids line)."""
    cmd = [os.path.join(build_dir(), "moe-generate"), "--model", model, "--max-new-tokens",
           str(max_new), "--print-ids", "--threads", "1", "--prompt", prompt] + list(extra)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")
    out = subprocess.run(cmd, capture_output=True, check=True, timeout=60, env=env).stdout
    text = out.decode("utf-8", errors="replace")
    i = text.rfind("\nids:")
    check(i >= 0, "moe-generate printed no ids: %r" % text)
    return text[:i]


def render_chat(model, messages):
    path = os.path.join(os.environ.get("MOE_IT_TMP", "/tmp"), "oa-msgs.json")
    with open(path, "w") as f:
        json.dump(messages, f)
    out = subprocess.run([os.path.join(build_dir(), "moe-chat-template"), "--model", model, path],
                         capture_output=True, check=True, timeout=30)
    return out.stdout.decode()


def raw_http(port, data, timeout=10):
    """Sends raw bytes, returns everything the server answers until it closes or goes quiet."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered early (413) and closed: read what it said
    chunks = []
    try:
        while True:
            try:
                b = s.recv(65536)
            except ConnectionResetError:
                break
            if not b:
                break
            chunks.append(b)
    except socket.timeout:
        pass
    s.close()
    return b"".join(chunks)


def statuses(resp):
    return [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3})", resp)]


def main():
    model = tiny_model()
    name = os.path.basename(model)
    failures = []
    with Cluster(np=3, model=model, args=["--http-listen", "127.0.0.1:0"]) as c:
        m = None
        deadline = time.time() + 10
        while m is None and time.time() < deadline:
            m = re.search(r"HTTP \(OpenAI API\) listening on \S+ \(port (\d+)\)", c.stderr())
            time.sleep(0.05)
        check(m is not None, "no HTTP listening line in the log")
        port = int(m.group(1))
        base = "http://127.0.0.1:%d/v1" % port
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)
        state = {}

        def run(tname, fn):
            try:
                fn()
                print("PASS %s" % tname, flush=True)
            except Exception as e:  # report every failure, keep going
                failures.append(tname)
                print("FAIL %s: %s: %s" % (tname, type(e).__name__, e), flush=True)

        def models():
            ms = client.models.list()
            ids = [x.id for x in ms.data]
            check(ids == [name], "models %r" % ids)

        def completion_greedy():
            r = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0)
            want = moe_generate_text(model, PROMPT, 12)
            got = r.choices[0].text
            check(got == want, "HTTP %r, moe-generate %r" % (got, want))
            check(r.object == "text_completion" and r.id.startswith("cmpl-"), "envelope %r" % r)
            check(r.usage.completion_tokens >= 1 and r.usage.prompt_tokens >= 1, "usage %r" % r.usage)
            check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "total")
            check(r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason)
            if r.choices[0].finish_reason == "length":
                check(r.usage.completion_tokens == 12, "length after %d" % r.usage.completion_tokens)
            state["text"] = got
            state["tokens"] = r.usage.completion_tokens

        def completion_stream():
            chunks = list(client.completions.create(model=name, prompt=PROMPT, max_tokens=12,
                                                    temperature=0, stream=True,
                                                    stream_options={"include_usage": True}))
            text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
            check(text == state["text"], "streamed %r vs %r" % (text, state["text"]))
            check(chunks[-1].usage is not None and chunks[-1].choices == [], "no usage chunk last")
            fins = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
            check(len(fins) == 1, "finish reasons %r" % fins)

        def chat_greedy():
            r = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=10,
                                               temperature=0)
            prompt = render_chat(model, MESSAGES)
            check(prompt.endswith("<|im_start|>assistant\n"), "rendered %r" % prompt)
            want = moe_generate_text(model, prompt, 10, extra=["--no-special"])
            got = r.choices[0].message.content
            check(got == want, "chat %r, moe-generate on the rendered prompt %r" % (got, want))
            check(r.choices[0].message.role == "assistant" and r.object == "chat.completion", "shape")
            tok = json.loads(raw_post(port, "/tokenize", {"messages": MESSAGES})[1])
            check(tok["count"] == r.usage.prompt_tokens, "prompt tokens %d vs /tokenize %d" %
                  (r.usage.prompt_tokens, tok["count"]))
            s = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=10,
                                               temperature=0, stream=True)
            parts = list(s)
            check(parts[0].choices[0].delta.role == "assistant", "first delta %r" % parts[0])
            text = "".join(p.choices[0].delta.content or "" for p in parts)
            check(text == got, "streamed chat %r vs %r" % (text, got))

        def stop_string():
            text = state["text"]
            cut = next((i for i in range(1, len(text)) if text[i].isprintable() and text[i] != "\ufffd"), None)
            check(cut is not None, "no usable stop in %r" % text)
            stop = text[cut]
            r = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0,
                                          stop=[stop])
            check(r.choices[0].finish_reason == "stop", "finish %r" % r.choices[0].finish_reason)
            check(r.choices[0].text == text[:text.index(stop)], "stopped %r of %r at %r" %
                  (r.choices[0].text, text, stop))

        def seeded():
            a = client.completions.create(model=name, prompt=PROMPT, max_tokens=16, temperature=1.0,
                                          seed=1234).choices[0].text
            b = client.completions.create(model=name, prompt=PROMPT, max_tokens=16, temperature=1.0,
                                          seed=1234).choices[0].text
            check(a == b, "same seed, different text: %r %r" % (a, b))

        def sdk_errors():
            cases = [
                (openai.NotFoundError, dict(model="no-such-model", prompt="x"), "model"),
                (openai.BadRequestError, dict(model=name, prompt="x", max_tokens=-1), "max_tokens"),
                (openai.BadRequestError, dict(model=name, prompt="x", temperature=-1), "temperature"),
                (openai.BadRequestError, dict(model=name, prompt="x " * 5000), "prompt"),
                (openai.BadRequestError, dict(model=name, prompt="x", n=0), "n"),
                (openai.BadRequestError, dict(model=name, prompt="x", n=17), "n"),
                (openai.BadRequestError, dict(model=name, prompt="x", stop=["w\0never"]), "stop"),
                (openai.BadRequestError, dict(model=name, prompt=[1, 2, 10 ** 7]), "prompt"),
            ]
            for cls, kw, param in cases:
                try:
                    client.completions.create(**kw)
                    raise TestFailure("no error for %r" % (kw,))
                except cls as e:
                    body = e.body if isinstance(e.body, dict) else {}
                    check(body.get("param") == param, "param %r for %r (%s)" % (body.get("param"), param, e))
                    check(body.get("message"), "no message for %r" % param)
            try:
                client.chat.completions.create(model=name, messages=[{"role": 5, "content": "x"}])
                raise TestFailure("bad role accepted")
            except openai.BadRequestError as e:
                check("messages[0].role" in str(e), str(e))
            # the template itself refuses: Qwen3's accepts anything, so check the message path
            try:
                client.chat.completions.create(model=name, messages=[])
                raise TestFailure("empty messages accepted")
            except openai.BadRequestError:
                pass

        def disconnect_cancels():
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            body = json.dumps({"model": name, "prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True,
                               "stream": True}).encode()
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            got = b""
            while b"data: " not in got:
                got += s.recv(4096)
            st = c.status()
            check(any(i.running > 0 or i.kv_blocks_used > 0 for i in st.instances), "not running: %s" % st)
            s.close()
            c.wait_idle(timeout=15)  # the cancel freed its KV everywhere

        def bad_http():
            post = lambda body, extra=b"": (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                            b"Connection: close\r\n" + extra +
                                            b"Content-Length: %d\r\n\r\n" % len(body) + body)
            check(statuses(raw_http(port, post(b"{not json")))[:1] == [400], "malformed JSON")
            check(statuses(raw_http(port, post(b'{"prompt": 5}')))[:1] == [400], "wrong type")
            check(statuses(raw_http(port, post(b'[1, 2]')))[:1] == [400], "not an object")
            r = raw_http(port, post(b'{"prompt": "a", "stop": "w\\u0000x"}'))
            check(statuses(r)[:1] == [400] and b"stop" in r and b"NUL" in r, "NUL escape: %r" % r[:300])
            big = b'{"prompt": "' + b"a" * (9 << 20) + b'"}'
            check(statuses(raw_http(port, post(big)))[:1] == [413], "huge body")
            r = raw_http(port, b"GET /v1/models HTTP/1.0\r\n\r\n")
            check(statuses(r)[:1] == [200] and name.encode() in r, "HTTP/1.0: %r" % r[:200])
            one = json.dumps({"prompt": PROMPT, "max_tokens": 2, "temperature": 0}).encode()
            req = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(one)) + one
            r = raw_http(port, req + req + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            check(statuses(r) == [200, 200, 200], "pipelined: %r" % statuses(r))
            check(statuses(raw_http(port, b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")) == [404], "404")
            check(statuses(raw_http(port, b"GET /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")) == [405], "405")
            flood = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(2000))
            r = raw_http(port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + flood + b"\r\n")
            check(not statuses(r) or statuses(r)[0] >= 400, "header flood answered %r" % statuses(r))
            # still serving
            check(statuses(raw_http(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")) == [200], "health after")
            r = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0)
            check(r.choices[0].text == state["text"], "after bad HTTP: %r" % r.choices[0].text)

        def n_choices():
            shared0 = c.status().counters.prefills_shared
            r = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0, n=3)
            shared = c.status().counters.prefills_shared - shared0
            check(shared == 2, "2 of the 3 choices should start on the first one's prefill: %d" % shared)
            check([c_.index for c_ in r.choices] == [0, 1, 2], "indices %r" % [c_.index for c_ in r.choices])
            check(all(c_.text == state["text"] for c_ in r.choices), "greedy choices differ: %r" % r.choices)
            single = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0)
            check(r.usage.completion_tokens == 3 * single.usage.completion_tokens, "usage %r" % r.usage)
            check(r.usage.prompt_tokens == single.usage.prompt_tokens, "prompt counted once")
            # seeded: choice i samples like a single request with seed + i
            r = client.completions.create(model=name, prompt=PROMPT, max_tokens=16, temperature=1.0,
                                          seed=77, n=2)
            for i in range(2):
                one = client.completions.create(model=name, prompt=PROMPT, max_tokens=16,
                                                temperature=1.0, seed=77 + i).choices[0].text
                check(r.choices[i].text == one, "choice %d %r vs seed %d %r" % (i, r.choices[i].text, 77 + i, one))
            parts = {}
            for ch in client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=8,
                                                     temperature=0, n=2, stream=True):
                for c_ in ch.choices:
                    parts.setdefault(c_.index, []).append(c_.delta.content or "")
            whole = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=8,
                                                   temperature=0).choices[0].message.content
            check(sorted(parts) == [0, 1] and all("".join(v) == whole for v in parts.values()),
                  "streamed n=2 chat %r vs %r" % (parts, whole))

        def logprobs_completion():
            r = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0,
                                          logprobs=3, user="someone")
            ch = r.choices[0]
            lp = ch.logprobs
            check(lp is not None and len(lp.tokens) == r.usage.completion_tokens, "logprobs %r" % lp)
            check(len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset),
                  "parallel arrays %r" % lp)
            if ch.finish_reason == "length":  # EOS is not text: the tokens then hold one more
                check("".join(lp.tokens) == ch.text, "tokens %r vs text %r" % (lp.tokens, ch.text))
            for i, (t, v, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
                check(v <= 0 and 1 <= len(top) <= 3, "token %d: %r %r" % (i, v, top))
                # greedy: the chosen token is the most likely one
                check(abs(max(top.values()) - v) < 1e-5, "greedy token %d: %r not the top of %r" % (i, v, top))
                check(sum(math.exp(x) for x in top.values()) <= 1 + 1e-4, "mass %r" % top)
            check(lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))],
                  "offsets %r" % lp.text_offset)
            state["lp"] = lp
            chunks = list(client.completions.create(model=name, prompt=PROMPT, max_tokens=12,
                                                    temperature=0, logprobs=3, stream=True))
            toks, vals = [], []
            for c_ in chunks:
                if c_.choices and c_.choices[0].logprobs:
                    toks += c_.choices[0].logprobs.tokens
                    vals += c_.choices[0].logprobs.token_logprobs
            check(toks == lp.tokens, "streamed tokens %r vs %r" % (toks, lp.tokens))
            check(all(abs(a - b) < 1e-6 for a, b in zip(vals, lp.token_logprobs)), "streamed values")
            # temperature 2 flattens the distribution the logprobs are taken from (after it)
            hot = client.completions.create(model=name, prompt=PROMPT, max_tokens=1, temperature=2.0,
                                            seed=3, logprobs=3).choices[0].logprobs
            cold, hot0 = lp.top_logprobs[0], hot.top_logprobs[0]
            common = [t for t in cold if t in hot0]
            check(len(common) >= 2, "T=2 top %r vs T=1 top %r" % (hot0, cold))
            for t in common[1:]:  # differences of log-probabilities halve at T = 2
                check(abs((hot0[t] - hot0[common[0]]) - (cold[t] - cold[common[0]]) / 2) < 1e-4,
                      "T=2 %r vs T=1 %r" % (hot0, cold))

        def logprobs_chat():
            r = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=8,
                                               temperature=0, logprobs=True, top_logprobs=2)
            content = r.choices[0].logprobs.content
            check(len(content) == r.usage.completion_tokens, "%d entries" % len(content))
            for e in content:
                check(bytes(e.bytes).decode("utf-8", "replace") == e.token, "bytes %r" % e)
                check(len(e.top_logprobs) == 2 and abs(e.top_logprobs[0].logprob - e.logprob) < 1e-5,
                      "greedy top %r" % e)
            if r.choices[0].finish_reason == "length":
                check("".join(e.token for e in content) == r.choices[0].message.content, "tokens vs text")
            parts = []
            for ch in client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=8,
                                                     temperature=0, logprobs=True, stream=True):
                if ch.choices and ch.choices[0].logprobs:
                    parts += [e.token for e in ch.choices[0].logprobs.content]
            check(parts == [e.token for e in content], "streamed chat logprobs %r" % parts)
            for kw, param in ((dict(top_logprobs=2), "top_logprobs"),
                              (dict(logprobs=True, top_logprobs=21), "top_logprobs")):
                try:
                    client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=2, **kw)
                    raise TestFailure("accepted %r" % kw)
                except openai.BadRequestError as e:
                    check(e.body.get("param") == param, "param %r for %r" % (e.body, kw))

        def penalties():
            base = dict(model=name, prompt=PROMPT, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
            plain = client.completions.create(**base).choices[0].text
            pen = client.completions.create(frequency_penalty=2.0, presence_penalty=2.0, **base).choices[0].text
            check(pen != plain, "penalties changed nothing: %r" % plain)
            rep = client.completions.create(extra_body={"ignore_eos": True, "repetition_penalty": 3.0},
                                            **{k: v for k, v in base.items() if k != "extra_body"})
            check(rep.choices[0].text != plain and rep.usage.completion_tokens == 24, "repetition %r" % rep)
            # seeded sampling with penalties is reproducible
            kw = dict(model=name, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=99,
                      presence_penalty=1.0, frequency_penalty=0.5)
            a = client.completions.create(**kw).choices[0].text
            check(a == client.completions.create(**kw).choices[0].text, "seeded+penalties not reproducible")
            for kw, param in ((dict(presence_penalty=2.5), "presence_penalty"),
                              (dict(frequency_penalty=-3), "frequency_penalty"),
                              (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
                              (dict(logprobs=21), "logprobs")):
                try:
                    client.completions.create(model=name, prompt="x", max_tokens=2, **kw)
                    raise TestFailure("accepted %r" % kw)
                except openai.BadRequestError as e:
                    check(e.body.get("param") == param, "param %r for %r" % (e.body, kw))

        def grpc_logprobs_and_penalties():
            import grpc
            import moeserve_pb2 as pb

            def gen(**sp):
                req = pb.GenerateRequest(text=PROMPT, max_new_tokens=16, ignore_eos=True,
                                         sampling=pb.SamplingParams(temperature=0, top_logprobs=20, **sp))
                ids, lps = [], []
                for m in c.stub.Generate(req, timeout=60):
                    ids += list(m.token_ids)
                    lps += list(m.logprobs)
                check(len(lps) == len(ids) == 16, "%d logprobs for %d tokens" % (len(lps), len(ids)))
                return ids, lps
            ids, raw = gen()
            # the same numbers as the HTTP API's (one engine behind both)
            http = state.get("lp")
            if http is not None:
                for i in range(min(len(raw), len(http.token_logprobs))):
                    check(abs(raw[i].logprob - http.token_logprobs[i]) < 1e-5, "gRPC vs HTTP at %d" % i)
            pp, fp = 0.75, 0.5
            pids, pen = gen(presence_penalty=pp, frequency_penalty=fp)
            # While both runs generated the same tokens, step j's logits differ exactly by the
            # penalty of each id's count among them: -(presence * (n > 0) + frequency * n).
            check(pids[0] == ids[0] and abs(pen[0].logprob - raw[0].logprob) < 1e-5, "index 0 penalised")
            penalised_seen = 0
            for j in range(1, len(ids)):
                if pids[:j] != ids[:j]:
                    break
                cnt = {t: ids[:j].count(t) for t in set(ids[:j])}
                want = lambda t: -(pp * (cnt.get(t, 0) > 0) + fp * cnt.get(t, 0))
                top_raw = dict(zip(raw[j].top_ids, raw[j].top_logprobs))
                top_pen = dict(zip(pen[j].top_ids, pen[j].top_logprobs))
                common = [t for t in top_raw if t in top_pen]
                check(len(common) >= 2, "too few common top ids at %d" % j)
                r0 = common[0]
                for t in common[1:]:
                    got = (top_pen[t] - top_pen[r0]) - (top_raw[t] - top_raw[r0])
                    check(abs(got - (want(t) - want(r0))) < 1e-4, "step %d id %d: %g, want %g" %
                          (j, t, got, want(t) - want(r0)))
                    penalised_seen += t in cnt
            check(penalised_seen > 0, "no penalised id among the top 20 (ids %r / %r)" % (ids, pids))
            try:
                for _ in c.stub.Generate(pb.GenerateRequest(text="x", max_new_tokens=2, sampling=pb.SamplingParams(
                        repetition_penalty=0)), timeout=30):
                    pass
                raise TestFailure("repetition_penalty 0 accepted")
            except grpc.RpcError as e:
                check(e.code() == grpc.StatusCode.INVALID_ARGUMENT and
                      e.details().startswith("GenerateRequest.sampling.repetition_penalty"), e.details())

        def grpc_prefill_group():
            # n choices over gRPC: n calls with one prefill_group share the prompt's prefill
            import threading
            import moeserve_pb2 as pb

            def req(seed, group=0, size=0):
                return pb.GenerateRequest(text=PROMPT, max_new_tokens=12, prefill_group=group,
                                          prefill_group_size=size,
                                          sampling=pb.SamplingParams(temperature=1.0, seed=seed))

            def text(r):
                return "".join(m.text for m in c.stub.Generate(r, timeout=60))
            shared0 = c.status().counters.prefills_shared
            out = {}
            th = [threading.Thread(target=lambda s=s_: out.__setitem__(s, text(req(s, 424242, 3))))
                  for s_ in (11, 12, 13)]
            for t in th:
                t.start()
            for t in th:
                t.join()
            check(c.status().counters.prefills_shared - shared0 == 2, "gRPC group: %d shared" %
                  (c.status().counters.prefills_shared - shared0))
            for s_ in (11, 12, 13):
                check(out[s_] == text(req(s_)), "seed %d: grouped %r vs alone" % (s_, out[s_]))
            import grpc
            try:
                text(req(1, 5, 1))
                raise TestFailure("group of 1 accepted")
            except grpc.RpcError as e:
                check(e.details().startswith("GenerateRequest.prefill_group_size"), e.details())

        def echo():
            # echo: the prompt's text, then the completion (moe-generate's greedy text); token-id
            # prompts echo their decoded text (the /detokenize endpoint's); echo with logprobs
            # (prompt logprobs) is refused naming the field
            want = PROMPT + state["text"]
            r = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0,
                                          echo=True, n=2)
            check([c_.text for c_ in r.choices] == [want, want], "echo: %r" % r.choices)
            check(r.usage.completion_tokens == 2 * state["tokens"], "echo usage %r" % r.usage)
            parts = "".join(ch.choices[0].text for ch in client.completions.create(
                model=name, prompt=PROMPT, max_tokens=12, temperature=0, echo=True, stream=True)
                if ch.choices)
            check(parts == want, "streamed echo %r vs %r" % (parts, want))
            ids = json.loads(raw_post(port, "/tokenize", {"prompt": PROMPT})[1])["tokens"]
            dec = json.loads(raw_post(port, "/detokenize", {"tokens": ids})[1])["prompt"]
            r = client.completions.create(model=name, prompt=ids, max_tokens=12, temperature=0,
                                          echo=True)
            check(r.choices[0].text.startswith(dec) and len(r.choices[0].text) > len(dec),
                  "token-id echo %r (decoded prompt %r)" % (r.choices[0].text, dec))
            for kw in (dict(logprobs=1), dict(logprobs=0)):
                try:
                    client.completions.create(model=name, prompt=PROMPT, max_tokens=2, echo=True, **kw)
                    raise TestFailure("echo with %r accepted" % kw)
                except openai.BadRequestError as e:
                    check(e.body.get("param") == "echo" and "logprobs" in e.body.get("message", ""),
                          "echo+logprobs: %r" % e.body)

        def grpc_n():
            # n choices in one gRPC call: one prefill, each message naming its choice, each
            # choice's own last message (finish, usage), choice i sampled with seed + i exactly as
            # moe-generate samples with that seed
            import grpc
            import moeserve_pb2 as pb
            shared0 = c.status().counters.prefills_shared
            msgs = list(c.stub.Generate(pb.GenerateRequest(
                text=PROMPT, max_new_tokens=12, n=3, request_id="grpc-n-1",
                sampling=pb.SamplingParams(temperature=1.0, seed=501)), timeout=60))
            check(c.status().counters.prefills_shared - shared0 == 2, "gRPC n=3: %d shared" %
                  (c.status().counters.prefills_shared - shared0))
            per = {}
            for m in msgs:
                check(m.request_id == "grpc-n-1", "request_id %r" % m.request_id)
                ch = per.setdefault(m.index, {"text": "", "ids": [], "idx": [], "ends": []})
                check(not ch["ends"], "choice %d: a message after its last" % m.index)
                ch["text"] += m.text
                ch["ids"] += m.token_ids
                ch["idx"] += m.token_indices
                if m.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    ch["ends"].append(m)
            check(sorted(per) == [0, 1, 2], "choice indices %r" % sorted(per))
            for i, ch in per.items():
                check(len(ch["ends"]) == 1, "choice %d: %d last messages" % (i, len(ch["ends"])))
                end = ch["ends"][0]
                check(end.HasField("usage") and end.usage.completion_tokens == len(ch["ids"]),
                      "choice %d: usage %s for %d tokens" % (i, end.usage, len(ch["ids"])))
                check(ch["idx"] == list(range(len(ch["ids"]))), "choice %d: indices %r" % (i, ch["idx"]))
                want = moe_generate_text(model, PROMPT, 12,
                                         extra=["--temperature", "1", "--seed", str(501 + i)])
                check(ch["text"] == want, "choice %d: %r, moe-generate seed %d: %r" %
                      (i, ch["text"], 501 + i, want))
            check(len({ch["text"] for ch in per.values()}) > 1, "3 seeds, one text: %r" % per)
            # greedy: every choice is the greedy text
            texts = {}
            for m in c.stub.Generate(pb.GenerateRequest(text=PROMPT, max_new_tokens=12, n=2,
                                                        sampling=pb.SamplingParams(temperature=0)),
                                     timeout=60):
                texts[m.index] = texts.get(m.index, "") + m.text
            check(texts == {0: state["text"], 1: state["text"]}, "greedy n=2: %r" % texts)
            for bad, why in ((dict(n=17), "GenerateRequest.n = 17"),
                             (dict(n=2, prefill_group=9, prefill_group_size=2), "GenerateRequest.n = 2")):
                try:
                    list(c.stub.Generate(pb.GenerateRequest(text=PROMPT, max_new_tokens=2, **bad),
                                         timeout=30))
                    raise TestFailure("accepted %r" % bad)
                except grpc.RpcError as e:
                    check(e.code() == grpc.StatusCode.INVALID_ARGUMENT and
                          e.details().startswith(why), "%r: %s %s" % (bad, e.code(), e.details()))

        def slow_and_unread_clients():
            # a client that sends half its headers and stalls, and one that streams a long
            # generation and never reads it: neither stops anyone else
            slow = socket.create_connection(("127.0.0.1", port), timeout=30)
            slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
            deaf = socket.socket()
            deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            deaf.connect(("127.0.0.1", port))
            body = json.dumps({"model": name, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True,
                               "stream": True, "logprobs": 5}).encode()
            deaf.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            t0 = time.time()
            r = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0)
            check(r.choices[0].text == state["text"], "beside slow clients: %r" % r.choices[0].text)
            check(time.time() - t0 < 30, "slow clients held others up")
            slow.close()
            deaf.close()
            c.wait_idle(timeout=30)  # the unread stream was cancelled, its KV freed

        def grpc_nul_refused():
            # the same NUL rule on the gRPC API, through grpcio (Python strings keep the NUL)
            import grpc
            import moeserve_pb2 as pb
            for kw, field in ((dict(text="hi", stop=["ok", "w\0never"]), "GenerateRequest.stop[1]"),
                              (dict(text="a\0b"), "GenerateRequest.text"),
                              (dict(text="hi", request_id="id\0x"), "GenerateRequest.request_id")):
                try:
                    for _ in c.stub.Generate(pb.GenerateRequest(max_new_tokens=2, **kw), timeout=30):
                        pass
                    raise TestFailure("gRPC admitted a NUL in %s" % field)
                except grpc.RpcError as e:
                    check(e.code() == grpc.StatusCode.INVALID_ARGUMENT and
                          e.details().startswith(field + ": holds a NUL byte"), "%s: %s %s" %
                          (field, e.code(), e.details()))

        def detokenize():
            t = json.loads(raw_post(port, "/tokenize", {"prompt": PROMPT})[1])
            d = json.loads(raw_post(port, "/detokenize", {"tokens": t["tokens"]})[1])
            check(PROMPT in d["prompt"], "detokenize %r" % d)

        for tname, fn in [("models", models), ("completion_greedy", completion_greedy),
                          ("completion_stream", completion_stream), ("chat_greedy", chat_greedy),
                          ("stop_string", stop_string), ("seeded", seeded), ("sdk_errors", sdk_errors),
                          ("disconnect_cancels", disconnect_cancels), ("bad_http", bad_http),
                          ("n_choices", n_choices), ("logprobs_completion", logprobs_completion),
                          ("logprobs_chat", logprobs_chat), ("penalties", penalties),
                          ("grpc_logprobs_and_penalties", grpc_logprobs_and_penalties),
                          ("grpc_prefill_group", grpc_prefill_group), ("grpc_n", grpc_n),
                          ("echo", echo),
                          ("slow_and_unread_clients", slow_and_unread_clients),
                          ("grpc_nul_refused", grpc_nul_refused), ("detokenize", detokenize)]:
            run(tname, fn)
        rc = c.stop()
        if rc != 0:
            failures.append("exit")
            print("FAIL moe-serve exited %s:\n%s" % (rc, c.stderr()[-3000:]))
    for tname, fn in (("n_choices_colocated", n_choices_colocated),
                      ("sliding_window_refused", sliding_window_refused)):
        try:
            fn()
            print("PASS %s" % tname, flush=True)
        except Exception as e:
            failures.append(tname)
            print("FAIL %s: %s: %s" % (tname, type(e).__name__, e), flush=True)
    print("%d failed" % len(failures))
    return 1 if failures else 0


def n_choices_colocated():
    """A colocated (mixed) instance: n choices share the prefill there too; each choice's text and
    logprobs equal a single request's with seed + i."""
    model = tiny_model()
    with Cluster(np=2, model=model, args=["--http-listen", "127.0.0.1:0", "--colocated"]) as c:
        m = None
        deadline = time.time() + 10
        while m is None and time.time() < deadline:
            m = re.search(r"HTTP \(OpenAI API\) listening on \S+ \(port (\d+)\)", c.stderr())
            time.sleep(0.05)
        check(m is not None, "no HTTP listening line in the log")
        cl = openai.OpenAI(base_url="http://127.0.0.1:%s/v1" % m.group(1), api_key="x", max_retries=0)
        kw = dict(model=os.path.basename(model), prompt=PROMPT, max_tokens=16, temperature=1.0, logprobs=2)
        r = cl.completions.create(n=3, seed=5, **kw)
        check(c.status().counters.prefills_shared == 2, "shared %d" % c.status().counters.prefills_shared)
        for i in range(3):
            one = cl.completions.create(seed=5 + i, **kw).choices[0]
            check(one.text == r.choices[i].text, "choice %d: %r vs %r" % (i, r.choices[i].text, one.text))
            check(one.logprobs.token_logprobs == r.choices[i].logprobs.token_logprobs, "logprobs %d" % i)
        rc = c.stop()
        check(rc == 0, "moe-serve exited %s" % rc)


def sliding_window_refused():
    """A Mixtral whose sliding_window (32) is below max_position_embeddings: a request past the
    window is refused at admission (400 / INVALID_ARGUMENT), as moe-generate refuses it."""
    import grpc
    import moeserve_pb2 as pb
    d = os.path.join(os.environ.get("MOE_IT_TMP", "/tmp"), "mixtral-sw")
    subprocess.run([os.path.join(build_dir(), "moe-gen-model"), "--arch", "mixtral", "--preset", "tiny",
                    "--seed", "1", "--out", d], check=True, capture_output=True, timeout=120)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg["sliding_window"] = 32
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    prompt = "one two three four five six"  # fits the window alone; + 30 new tokens does not
    gen = subprocess.run([os.path.join(build_dir(), "moe-generate"), "--model", d, "--prompt", prompt,
                          "--max-new-tokens", "30"], capture_output=True, text=True, timeout=60)
    check(gen.returncode != 0 and "over the context length of 32" in gen.stderr,
          "moe-generate: %r" % gen.stderr)
    with Cluster(np=3, model=d, args=["--http-listen", "127.0.0.1:0"]) as c:
        m = None
        deadline = time.time() + 10
        while m is None and time.time() < deadline:
            m = re.search(r"HTTP \(OpenAI API\) listening on \S+ \(port (\d+)\)", c.stderr())
            time.sleep(0.05)
        check(m is not None, "no HTTP line")
        client = openai.OpenAI(base_url="http://127.0.0.1:%s/v1" % m.group(1), api_key="x", max_retries=0)
        try:
            client.completions.create(model="mixtral-sw", prompt=prompt, max_tokens=30)
            raise TestFailure("a prompt past sliding_window was admitted")
        except openai.BadRequestError as e:
            check(re.search(r"context length (of )?32", str(e)), str(e))
        try:
            for _ in c.stub.Generate(pb.GenerateRequest(text=prompt, max_new_tokens=30), timeout=30):
                pass
            raise TestFailure("gRPC admitted a prompt past sliding_window")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.INVALID_ARGUMENT, "gRPC %s" % e.code())
        r = client.completions.create(model="mixtral-sw", prompt="one two", max_tokens=4)
        check(r.usage.completion_tokens >= 1, "a request inside the window failed")
        check(c.stop() == 0, "moe-serve exit")


def raw_post(port, path, obj):
    body = json.dumps(obj).encode()
    r = raw_http(port, b"POST %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
                 % (path.encode(), len(body)) + body)
    head, _, rest = r.partition(b"\r\n\r\n")
    return statuses(head)[0], rest.decode()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TestFailure as e:
        print("FAIL: %s" % e)
        sys.exit(1)
