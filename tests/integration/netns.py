"""Several hosts on one machine for the cluster tests: each host is a network namespace with one
veth onto a bridge that lives in a namespace of its own (the run's "switch"), so nothing of it
touches the root namespace: the test subnet exists only inside the run's namespaces, and two runs
side by side (same subnet, each behind its own switch) cannot see each other.

    with netns.Hosts(3, delay="200us", rate="1gbit") as hosts:
        a, b, c = hosts.names              # namespace names, also the hosts' names everywhere
        p = hosts.popen(a, ["sleep", "60"])  # a process in host a (gethostname() == a there too)
        port = hosts.forward(a, 50051)     # 127.0.0.1:port here reaches 127.0.0.1:50051 in a
        hosts.cut(b); hosts.restore(b)     # unplug / replug b's cable
        hosts.signal(p, signal.SIGSTOP)    # or kill9(p), stop(p), cont(p)

Each host resolves every host by name (/etc/netns/NAME/hosts, which `ip netns exec` mounts over
/etc/hosts). Links are shaped with tc: netem delay (and rate) where the kernel has netem, a tbf rate
limit otherwise (hosts.shaping says which; delay is then absent and reported as such). Open MPI
across hosts: hosts.hostfile({a: 2, b: 1}), hosts.mpirun_args(hostfile) (the rsh agent
netns_agent.sh, btl tcp,self, pml ob1, both interface filters on the test subnet) and
hosts.env() (UCX_TLS=tcp on eth0: UCX would otherwise reach across namespaces through shared
memory, bypassing the links).

Cleanup: everything made (namespaces, their processes, veths, bridge, /etc/netns/NAME) is removed
on exit, on an exception, on SIGTERM/SIGINT; a run killed with SIGKILL leaves it behind for the
next Hosts() of the same prefix to remove (a run is alive while it holds the flock on its lock file
in /run/moe-netns). Not root or no `ip netns`: Hosts() raises Unavailable (a skip, with the
reason)."""

import ctypes
import fcntl
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

SUBNET = "198.18.0.0/24"  # RFC 2544's benchmarking range: never routed, and only inside the run's namespaces
PREFIX_LEN = 24
STATE_DIR = "/run/moe-netns"
AGENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "netns_agent.sh")
CLONE_NEWNET = 0x40000000


class Unavailable(Exception):
    """Network namespaces cannot be made here (not root, no `ip netns`): the test is skipped."""


def _run(*cmd, check=True):
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError("%s: exit %d: %s" % (" ".join(cmd), r.returncode, r.stderr.strip()))
    return r


def available():
    """None when namespaces can be made here, else the reason why not."""
    if os.geteuid() != 0:
        return "not root (network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "iproute2's ip and tc are not installed"
    probe = "moe-probe-%d-%s" % (os.getpid(), secrets.token_hex(3))
    r = _run("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        return "`ip netns add` fails: %s" % r.stderr.strip()
    _run("ip", "netns", "del", probe, check=False)
    return None


def _netns_list():
    r = _run("ip", "netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def _kill_netns_processes(ns):
    """SIGKILLs every process in namespace ns and waits (a namespace outlives `ip netns del` while
    a process holds it)."""
    for _ in range(50):
        pids = [int(p) for p in _run("ip", "netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _delete_netns(ns):
    _kill_netns_processes(ns)
    _run("ip", "netns", "del", ns, check=False)
    shutil.rmtree("/etc/netns/" + ns, ignore_errors=True)


def remove_leftovers(prefix):
    """Removes the namespaces of runs of this prefix whose owner is gone (its lock is free)."""
    os.makedirs(STATE_DIR, exist_ok=True)
    pat = re.compile(r"^%s-([0-9a-f]+)-" % re.escape(prefix))
    runs = {}
    for ns in _netns_list():
        m = pat.match(ns)
        if m:
            runs.setdefault(m.group(1), []).append(ns)
    removed = []
    for run, names in runs.items():
        lock = os.path.join(STATE_DIR, "%s-%s.lock" % (prefix, run))
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # its owner is alive: a parallel run
        for ns in names:
            _delete_netns(ns)
            removed.append(ns)
        for f in os.listdir(STATE_DIR):
            if f.startswith("%s-%s." % (prefix, run)) and f.endswith(".hosts"):
                os.unlink(os.path.join(STATE_DIR, f))
        os.unlink(lock)
        os.close(fd)
    return removed


def _rate_bits(rate):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)(bit|bps)", rate.lower())
    if not m:
        raise ValueError("rate %r: expected tc's form, e.g. 1gbit, 500mbit" % rate)
    v = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    return v * (8 if m.group(3) == "bps" else 1)


class Hosts:
    """N hosts (network namespaces) on one private bridge; see the module's doc."""

    def __init__(self, n=3, delay=None, rate=None, prefix="moet", hosts=None):
        why = available()
        if why:
            raise Unavailable(why)
        self.prefix = prefix
        self.removed_leftovers = remove_leftovers(prefix)
        self.run = secrets.token_hex(3)
        self._lock_path = os.path.join(STATE_DIR, "%s-%s.lock" % (prefix, self.run))
        self._lock = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        base = "%s-%s" % (prefix, self.run)
        self.switch = base + "-sw"
        labels = list(hosts) if hosts else ["h%d" % (i + 1) for i in range(n)]
        self.names = [base + "-" + label for label in labels]
        self.label = dict(zip(self.names, labels))
        net = SUBNET.split("/")[0].rsplit(".", 1)[0]
        self.addr = {name: "%s.%d" % (net, i + 1) for i, name in enumerate(self.names)}
        self.port_of = {name: "p%d" % (i + 1) for i, name in enumerate(self.names)}  # switch side
        self.shaping = None
        self._procs = []
        self._forwarders = []
        self._files = []
        self._closed = False
        self._old_handlers = {}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: the caller handles signals
                pass
        try:
            self._build()
            if delay or rate:
                for name in self.names:
                    self.shape(name, delay=delay, rate=rate)
        except BaseException:
            self.close()
            raise

    # ---- topology ----
    def _build(self):
        sw = self.switch
        _run("ip", "netns", "add", sw)
        _run("ip", "-n", sw, "link", "add", "br0", "type", "bridge", "forward_delay", "0", "stp_state", "0")
        _run("ip", "-n", sw, "link", "set", "br0", "up")
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += ["%s %s %s" % (self.addr[h], h, self.label[h]) for h in self.names]
        for h in self.names:
            _run("ip", "netns", "add", h)
            os.makedirs("/etc/netns/" + h, exist_ok=True)
            with open("/etc/netns/%s/hosts" % h, "w") as f:
                f.write("\n".join(lines) + "\n")
            p = self.port_of[h]
            _run("ip", "-n", sw, "link", "add", p, "type", "veth", "peer", "name", "eth0", "netns", h)
            _run("ip", "-n", sw, "link", "set", p, "master", "br0", "up")
            _run("ip", "-n", h, "addr", "add", "%s/%d" % (self.addr[h], PREFIX_LEN), "dev", "eth0")
            _run("ip", "-n", h, "link", "set", "eth0", "up")
            _run("ip", "-n", h, "link", "set", "lo", "up")

    def shape(self, host, delay=None, rate=None):
        """Shapes host's link: `delay` (tc time, e.g. "200us") one way on what the host sends, `rate`
        (tc rate, e.g. "1gbit") in both directions. netem where the kernel has it, else tbf (rate
        only). Returns what was applied and sets self.shaping to it."""
        applied = []
        for ns, dev, d in ((host, "eth0", delay), (self.switch, self.port_of[host], None)):
            _run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
            if not d and not rate:
                continue
            netem = ["netem", "limit", "100000"] + (["delay", d] if d else []) + (["rate", rate] if rate else [])
            r = _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *netem, check=False)
            if r.returncode == 0:
                applied.append("netem" + (" delay " + d if d else "") + (" rate " + rate if rate else ""))
                continue
            if "unknown" not in r.stderr.lower():
                raise RuntimeError("tc netem on %s/%s: %s" % (ns, dev, r.stderr.strip()))
            if rate:
                # 1 ms of tokens (at least 256 KiB: veth hands tbf GSO packets up to 64 KiB)
                burst = max(int(_rate_bits(rate) / 8 / 1000), 256 * 1024)
                _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                     "burst", str(burst), "latency", "50ms")
                applied.append("tbf rate " + rate)
            if d:
                applied.append("no delay (the kernel has no netem)")
        self.shaping = ", ".join(sorted(set(applied))) or None
        return self.shaping

    def cut(self, host):
        """Unplugs host's cable (its switch port down): its packets vanish both ways, as when a
        host dies or is partitioned; the host itself sees no carrier."""
        _run("ip", "-n", self.switch, "link", "set", self.port_of[host], "down")

    def restore(self, host):
        _run("ip", "-n", self.switch, "link", "set", self.port_of[host], "up")

    def link_bytes(self, host):
        """(received, sent) bytes as seen by the host's eth0: what crossed its link."""
        out = _run("ip", "netns", "exec", host, "cat", "/sys/class/net/eth0/statistics/rx_bytes",
                   "/sys/class/net/eth0/statistics/tx_bytes").stdout.split()
        return int(out[0]), int(out[1])

    # ---- processes ----
    def command(self, host, argv):
        """argv run in host: its network namespace, its /etc/hosts, and its own UTS namespace whose
        hostname is the host's name (what Open MPI and moe-serve report as the host)."""
        return ["ip", "netns", "exec", host, "unshare", "--uts", "--", "/bin/sh", "-c",
                'hostname "$0" && exec "$@"', host] + list(argv)

    def popen(self, host, argv, **kw):
        """subprocess.Popen of argv in host (same pid as the program: every layer execs). Killed
        at cleanup if still running. kw go to Popen (start_new_session defaults to True)."""
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(self.command(host, argv), **kw)
        self._procs.append(p)
        return p

    @staticmethod
    def signal(proc_or_pid, sig):
        pid = proc_or_pid if isinstance(proc_or_pid, int) else proc_or_pid.pid
        os.kill(pid, sig)

    def kill9(self, p):
        self.signal(p, signal.SIGKILL)

    def stop(self, p):
        self.signal(p, signal.SIGSTOP)

    def cont(self, p):
        self.signal(p, signal.SIGCONT)

    def host_of(self, pid):
        """The host whose network namespace process pid is in (None: not one of ours)."""
        try:
            ino = os.stat("/proc/%d/ns/net" % pid).st_ino
        except OSError:  # gone, or not ours to see
            return None
        for h in self.names:
            if os.stat("/run/netns/" + h).st_ino == ino:
                return h
        return None

    def pids(self, host):
        return [int(p) for p in _run("ip", "netns", "pids", host).stdout.split()]

    @staticmethod
    def descendants(pid):
        """The pids of every process below pid (children, their children...)."""
        children = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open("/proc/%s/stat" % d) as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(d))
        out, todo = [], [pid]
        while todo:
            for c in children.get(todo.pop(), []):
                out.append(c)
                todo.append(c)
        return out

    def mpi_ranks(self, exe, root=None):
        """{MPI rank: pid} of the running processes of program exe (a path) in this run's hosts,
        from their environment; with root (an mpirun's pid), only that job's ranks: those below
        it and, on the far hosts (under orteds that are not its children), those of its job id."""
        exe = os.path.realpath(exe)
        found = []  # (pid, rank, job id)
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                if os.path.realpath("/proc/%s/exe" % d) != exe or self.host_of(int(d)) is None:
                    continue
                with open("/proc/%s/environ" % d, "rb") as f:
                    env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            except OSError:
                continue
            if b"OMPI_COMM_WORLD_RANK" in env:
                found.append((int(d), int(env[b"OMPI_COMM_WORLD_RANK"]), env.get(b"OMPI_MCA_ess_base_jobid")))
        if root:
            below = set(self.descendants(root))
            jobs = {job for pid, _, job in found if pid in below}
            found = [f for f in found if f[2] in jobs]
        return {rank: pid for pid, rank, _ in found}

    # ---- Open MPI ----
    def hostfile(self, slots, path=None):
        """Writes an Open MPI hostfile, {host: slots} in mapping order (ranks fill the first host's
        slots, then the next one's); returns its path (a new file of the run's state directory by
        default, removed at cleanup: one per mpirun job)."""
        if not path:
            path = os.path.join(STATE_DIR, "%s-%s.%d.hosts" % (self.prefix, self.run, len(self._files)))
            self._files.append(path)
        with open(path, "w") as f:
            for h, n in slots.items():
                f.write("%s slots=%d\n" % (h, n))
        return path

    def mpirun_args(self, hostfile):
        """mpirun options that place ranks by the hostfile, start the far ones through the netns
        rsh agent, and keep MPI's traffic (out-of-band and point-to-point) on the test subnet over
        TCP: ob1 + btl tcp,self, so neither UCX nor shared memory crosses between hosts."""
        return ["--hostfile", hostfile, "--map-by", "slot",
                "--mca", "plm_rsh_agent", AGENT, "--mca", "plm_rsh_no_tree_spawn", "1",
                "--mca", "pml", "ob1", "--mca", "btl", "tcp,self",
                "--mca", "btl_tcp_if_include", SUBNET, "--mca", "oob_tcp_if_include", SUBNET]

    @staticmethod
    def env():
        """Environment for programs that use UCX themselves: TCP over the host's eth0 only (UCX's
        shared-memory transports would reach another namespace of this machine directly)."""
        return {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "eth0"}

    # ---- reaching a host's port from the test process ----
    def forward(self, host, port, addr="127.0.0.1"):
        """Listens on 127.0.0.1:<returned port> in the test's own namespace and relays each
        connection to addr:port inside host (its loopback by default): a client in the test
        process (grpcio) can reach a server that listens on a host's 127.0.0.1."""
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(64)
        self._forwarders.append(lsock)
        t = threading.Thread(target=self._accept_loop, args=(lsock, host, addr, port), daemon=True)
        t.start()
        return lsock.getsockname()[1]

    def _accept_loop(self, lsock, host, addr, port):
        while True:
            try:
                c, _ = lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(c, host, addr, port), daemon=True).start()

    def _relay(self, client, host, addr, port):
        # setns moves only this thread (a dedicated one) into the host's namespace; the socket
        # made here belongs to that namespace for good.
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open("/run/netns/" + host, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                client.close()
                return
        finally:
            os.close(fd)
        try:
            up = socket.create_connection((addr, port), timeout=10)
            up.settimeout(None)
        except OSError:
            client.close()
            return
        for s in (client, up):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def pump(src, dst):
            try:
                while True:
                    b = src.recv(1 << 16)
                    if not b:
                        break
                    dst.sendall(b)
            except OSError:
                pass
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        other = threading.Thread(target=pump, args=(up, client), daemon=True)
        other.start()
        pump(client, up)
        other.join()
        client.close()
        up.close()

    # ---- cleanup ----
    def _on_signal(self, sig, frame):
        self.close()
        raise SystemExit(128 + sig)

    def close(self):
        """Removes everything this run made; idempotent."""
        if self._closed:
            return
        self._closed = True
        for s in self._forwarders:
            try:
                s.close()
            except OSError:
                pass
        for p in self._procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for h in self.names + [self.switch]:
            _delete_netns(h)
        for path in self._files + [self._lock_path]:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        os.close(self._lock)
        for sig, old in self._old_handlers.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def skip(reason):
    """Reports a skip the way run.sh shows it (exit status 77, the reason on stdout)."""
    print("SKIP: %s" % reason)
    sys.stdout.flush()
    return 77
