"""The HTTP API against clients nobody here wrote: the official `openai` Python SDK and raw sockets.

Starts a cluster (1 prefill + 1 decode) on the built-in tiny model (build/models/tiny, which carries
Qwen3-MoE's real chat template) with --http-listen, then: completions and chat, streamed and not,
greedy text equal to moe-generate's (chat: on the prompt moe-chat-template renders), usage, stop,
n > 1 (streamed and not, seeded choices as single requests with seed + i),
seed, errors raised as the SDK's own exception classes, NUL bytes refused on both APIs, a client that disconnects mid-stream
(its KV must come back), and bad HTTP (malformed JSON, wrong types, a huge body, HTTP/1.0,
pipelining, NUL escapes, unknown paths) each with its status while the server keeps serving.
Usage: MOE_BUILD_DIR=build python3 openai_client_test.py   (run.sh sets PYTHONPATH and the dir)
"""
import json
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
            r = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0, n=3)
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
                          ("n_choices", n_choices), ("grpc_nul_refused", grpc_nul_refused), ("detokenize", detokenize)]:
            run(tname, fn)
        rc = c.stop()
        if rc != 0:
            failures.append("exit")
            print("FAIL moe-serve exited %s:\n%s" % (rc, c.stderr()[-3000:]))
    try:
        sliding_window_refused()
        print("PASS sliding_window_refused", flush=True)
    except Exception as e:
        failures.append("sliding_window_refused")
        print("FAIL sliding_window_refused: %s: %s" % (type(e).__name__, e), flush=True)
    print("%d failed" % len(failures))
    return 1 if failures else 0


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
