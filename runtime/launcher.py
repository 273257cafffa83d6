"""The tritonserver process: the model repository it serves, finding the binary, starting it
(loopback, gRPC only, admin protocols behind a key), watching it, stopping it leaving nothing behind.

fill_template, write_repository   triton_repo/esdllm/config.pbtxt's ${name} values filled into a copy
find_tritonserver   --tritonserver PATH, else `tritonserver` on PATH, else the one inside the
                    nvidia-pytriton wheel (python backend only; see DESIGN.md §2)
TritonServer        one server process: start, ready, stubs, health, memory, shm, stop
Supervisor          restarts the server (with backoff) when it or its stub dies or its memory runs away
"""
from __future__ import annotations

import importlib.resources
import importlib.util
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

REPO_TEMPLATE = Path(str(importlib.resources.files("esdllm") / "triton_repo"))  # shipped as package data
MODEL_NAME = "esdllm"
_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free ports (all held open while choosing: two calls of one could collide)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


RAW_VALUES = ("inputs", "instance_group")  # placeholders filled with protobuf text as it is (generated, not user text)


def fill_template(text: str, values: dict[str, object]) -> str:
    """Replace every ${name}; values are escaped for a double-quoted protobuf text string, except
    RAW_VALUES, which are blocks of config text."""
    missing = sorted({m for m in _PLACEHOLDER.findall(text) if m not in values})
    if missing:
        raise ValueError(f"config template needs values for {', '.join(missing)}")
    esc = {k: str(v) if k in RAW_VALUES else str(v).replace("\\", "\\\\").replace('"', '\\"')
           for k, v in values.items()}
    return _PLACEHOLDER.sub(lambda m: esc[m.group(1)], text)


def write_repository(out: str | Path, values: dict, template: Path = REPO_TEMPLATE, extra: tuple = ()) -> Path:
    """A ready model repository at `out`: <out>/<model_name>/{config.pbtxt, 1/...}, plus the template's
    `extra` models under their own names (bench-serve's "noop")."""
    for name in (MODEL_NAME, *extra):
        src, dst = template / name, Path(out) / (values["model_name"] if name == MODEL_NAME else name)
        if not (src / "config.pbtxt").is_file():
            raise FileNotFoundError(f"no model template at {src}")
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        (dst / "config.pbtxt").write_text(fill_template((src / "config.pbtxt").read_text(encoding="utf-8"), values))
    return Path(out)


def _pytriton_dir() -> Path | None:
    import importlib.util
    spec = importlib.util.find_spec("pytriton")
    return Path(spec.origin).parent / "tritonserver" if spec and spec.origin else None


def find_tritonserver(explicit: str | None = None) -> tuple[Path, bool]:
    """(binary, from_wheel). from_wheel: the pytriton one, which needs a backend dir set up."""
    if explicit:
        p = Path(explicit)
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise FileNotFoundError(f"--tritonserver {explicit} is not an executable file")
        return p, False
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path), False
    d = _pytriton_dir()
    if d is not None and (d / "bin" / "tritonserver").is_file():
        return d / "bin" / "tritonserver", True
    raise FileNotFoundError("no tritonserver found: put one on PATH, pass --tritonserver PATH, "
                            "or `pip install nvidia-pytriton` (the esdllm[serve] extra)")


def wheel_backend_dir(work: Path) -> tuple[Path, list[str]]:
    """The pytriton wheel's python backend with this interpreter's stub beside libtriton_python.so
    (the server looks for it there), plus the library dirs the server and the stub need."""
    d = _pytriton_dir()
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = d / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not stub.is_file():
        raise FileNotFoundError(f"the nvidia-pytriton wheel has no python backend stub for Python {ver} ({stub})")
    be = work / "backends" / "python"
    shutil.copytree(d / "backends" / "python", be, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, be / "triton_python_backend_stub")
    libs = [str(d.parent.parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR") or ""]
    return work / "backends", [p for p in libs if p]


# Admin protocols no client of the model needs: registering shared memory (the server would then
# write answers into any region a client names), switching logging off, the model repository and
# config, statistics, tracing. They stay behind a key only the launcher holds.
RESTRICTED = "model-repository,model-config,shared-memory,statistics,trace,logging"
ADMIN_HEADER = "esdllm-admin-key"
STUB = "triton_python_backend_stub"


class TritonServer:
    """One tritonserver process on `values`' model repository. Use as a context manager, or
    start() / stop(). Logs go to `log` (a file path) or are inherited when log is None.

    Exposed: gRPC on host:grpc_port (loopback by default) with the admin protocols (RESTRICTED)
    behind a random key; HTTP only when http_port is given (Triton 2.51's HTTP front end can be
    crashed by one request: README "Running it in production"), restricted the same way; no
    metrics. The python stub's shared-memory regions carry a per-server prefix: made private
    (0600) once the model is up, removed on stop."""

    def __init__(self, values: dict, *, host: str = "127.0.0.1", grpc_port: int = 8001, http_port: int | None = None,
                 tritonserver: str | None = None, log: str | Path | None = None, extra_args: tuple = (),
                 exit_timeout: int = 3, extra_models: tuple = ()):
        self.extra_models = tuple(extra_models)  # template models served beside esdllm (write_repository)
        self.values, self.host, self.grpc_port, self.http_port = values, host, grpc_port, http_port
        self.binary, self.from_wheel = find_tritonserver(tritonserver)
        self.log, self.extra_args, self.exit_timeout = log, tuple(extra_args), exit_timeout
        self.admin_key = secrets.token_hex(16)
        self.shm_prefix = f"esdllm_{secrets.token_hex(6)}_"
        self.proc: subprocess.Popen | None = None
        self.work: Path | None = None
        self._log_file = None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str | None:
        return None if self.http_port is None else f"http://{self.host}:{self.http_port}"

    @property
    def admin_headers(self) -> dict[str, str]:
        """gRPC metadata that opens the restricted protocols (tritonclient headers=)."""
        return {f"triton-grpc-protocol-{ADMIN_HEADER}": self.admin_key}

    def command(self, repo: Path, backend_dir: Path | None) -> list[str]:
        key = f"{RESTRICTED}:{ADMIN_HEADER}={self.admin_key}"
        cmd = [str(self.binary), f"--model-repository={repo}", f"--grpc-address={self.host}",
               f"--grpc-port={self.grpc_port}", f"--grpc-restricted-protocol={key}", "--allow-metrics=false",
               f"--exit-timeout-secs={self.exit_timeout}",
               # Triton keeps request objects for reuse, each holding the capacity of the largest
               # message it carried: multi-MB prompts then grow the server for good (README)
               "--grpc-infer-allocation-pool-size=0",
               f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}"]
        if self.http_port is None:
            cmd.append("--allow-http=false")
        else:
            cmd += [f"--http-address={self.host}", f"--http-port={self.http_port}", f"--http-restricted-api={key}"]
        if backend_dir is not None:
            cmd.append(f"--backend-directory={backend_dir}")
        return cmd + list(self.extra_args)

    def environment(self, libs: list[str]) -> dict[str, str]:
        env = dict(os.environ)
        # The wheel's stub runs an isolated interpreter (PYTHONPATH and other PYTHON* variables are
        # ignored); it finds its environment, and so esdllm, through the `python3` first on PATH.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
        # glibc raises its mmap threshold after every large free, so a burst of multi-MB requests
        # leaves their buffers in the heap for good; a fixed threshold hands them back to the OS.
        # The model process raises its own and trims its heap when idle (serving.tune_malloc)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(256 << 10))
        return env

    def start(self, timeout: float = 180.0) -> "TritonServer":
        self.work = Path(tempfile.mkdtemp(prefix="esdllm-triton-"))
        try:
            repo = write_repository(self.work / "models", self.values, extra=self.extra_models)
            backend_dir, libs = wheel_backend_dir(self.work) if self.from_wheel else (None, [])
            out = None
            if self.log is not None:
                self._log_file = out = open(self.log, "ab")
            self.proc = subprocess.Popen(self.command(repo, backend_dir), env=self.environment(libs),
                                         stdout=out, stderr=subprocess.STDOUT if out else None,
                                         start_new_session=True,  # Ctrl-C reaches us; we stop it in order
                                         umask=0o077)  # what it creates is its user's alone
            self.wait_ready(timeout)
            self.secure_shm()
        except BaseException:
            self.stop()
            raise
        return self

    def _client(self):
        import tritonclient.grpc as grpcclient
        return grpcclient.InferenceServerClient(self.grpc_url)

    def ready(self) -> bool:
        """The model answers gRPC readiness (False while the server is down or loading)."""
        try:
            with self._client() as c:
                return bool(c.is_model_ready(self.values["model_name"]))
        except Exception:  # refused connection, UNAVAILABLE: not ready
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.proc.returncode} before it was ready"
                                   + self._log_tail())
            if self.ready():
                return
            time.sleep(0.25)
        raise TimeoutError(f"tritonserver was not ready after {timeout:.0f} s" + self._log_tail())

    def stubs(self) -> list[int]:
        """pids of the live (not zombie) python-backend stubs of this server."""
        if self.proc is None:
            return []
        out = []
        for pid in _children(self.proc.pid):
            stat = _stat(pid)
            if stat and stat[0] == STUB[:15] and stat[1] != "Z":
                out.append(pid)
        return out

    def health(self) -> str | None:
        """None while the server and its model's stub live; else what died."""
        if self.proc is None or self.proc.poll() is not None:
            return f"tritonserver exited with code {None if self.proc is None else self.proc.returncode}"
        if not self.stubs():
            return "the python backend stub of the model died (Triton 2.51 neither notices nor restarts it)"
        return None

    def rss_kib(self) -> dict[str, int]:
        """Resident memory of the server and of its stubs, KiB; *_shm is the part of each that is the
        python backend's shared-memory pool, which both map (it grows in regions for large messages
        and keeps them)."""
        out = {"tritonserver": _rss(self.proc.pid) if self.proc else 0,
               "tritonserver_shm": _rss(self.proc.pid, "RssShmem:") if self.proc else 0}
        stubs = self.stubs()
        out["stubs"] = sum(_rss(p) for p in stubs)
        out["stubs_shm"] = sum(_rss(p, "RssShmem:") for p in stubs)
        return out

    def shm_regions(self) -> list[Path]:
        return sorted(Path("/dev/shm").glob(self.shm_prefix + "*"))

    def secure_shm(self) -> None:
        """Triton creates the stub's region 0644 whatever the umask (Boost's default permissions):
        make it readable by the server's user only."""
        for f in self.shm_regions():
            try:
                f.chmod(0o600)
            except OSError:
                pass

    def _log_tail(self, n: int = 12) -> str:
        if self.log is None or not Path(self.log).is_file():
            return ""
        lines = Path(self.log).read_text(errors="replace").splitlines()
        errors = [ln[:2000] for ln in lines if re.match(r"E\d{4} ", ln)]  # Triton's error lines
        return (f"\n--- tritonserver log {self.log}: the last {n} lines, then the errors ---\n"
                + "\n".join(lines[-n:] + errors[-5:]))

    def stop(self, timeout: float | None = None) -> None:
        """SIGINT (Triton unloads the model and exits, waiting at most exit_timeout for requests
        in flight), then SIGKILL to the server alone, so its stubs notice and remove their shared
        memory; then SIGKILL to whatever is left of the process group, and the regions removed."""
        timeout = self.exit_timeout + 5 if timeout is None else timeout
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            deadline = time.monotonic() + 2.0  # stubs check their parent every ~300 ms
            while _group_alive(self.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            try:  # stubs left behind by a crashed server, or stuck ones
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for f in self.shm_regions():
            f.unlink(missing_ok=True)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work = None

    def __enter__(self) -> "TritonServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _stat(pid: int) -> tuple[str, str] | None:
    """(comm, state) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    return comm, text[text.rindex(")") + 2]


def _rss(pid: int, field: str = "VmRSS:") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class Supervisor:
    """Keeps one TritonServer serving: checks it every `every` seconds and restarts it, with
    backoff (1, 2, 4 ... 30 s; reset after a minute of health), when the server or its model's stub
    dies, or when the server's memory grew by more than `rss_growth_mib` since it became ready.
    A restart kills the requests in flight: their clients get an error (UNAVAILABLE), never a hang."""

    def __init__(self, server: TritonServer, *, restart: bool = True, every: float = 0.5,
                 rss_growth_mib: int = 1024, log=None):
        self.server, self.restart, self.every, self.rss_growth_mib = server, restart, every, rss_growth_mib
        self.log = log or (lambda msg: print(f"esdllm serve: {msg}", file=sys.stderr, flush=True))
        self.restarts = 0
        self.up = threading.Event()  # set while a started server is being watched

    def run(self, timeout: float, until=lambda: False) -> int:
        """Serve until `until()` is true (then 0) or the server dies with restarts off (its exit code)."""
        srv, backoff = self.server, 1.0
        srv.start(timeout)
        self.up.set()
        base, healthy_since = srv.rss_kib()["tritonserver"], time.monotonic()
        while not until():
            time.sleep(self.every)
            why = srv.health()
            if why is None and self.rss_growth_mib:
                grown = (srv.rss_kib()["tritonserver"] - base) // 1024
                if grown > self.rss_growth_mib:
                    why = f"tritonserver grew by {grown} MiB since it was ready (limit {self.rss_growth_mib})"
            if why is None:
                if time.monotonic() - healthy_since > 60:
                    backoff = 1.0
                continue
            if not self.restart:
                self.log(f"{why}; not restarting (--no-restart)")
                code = srv.proc.returncode if srv.proc and srv.proc.poll() is not None else 1
                srv.stop()
                return code or 1
            self.up.clear()
            started = False
            while not started and not until():
                self.log(f"{why}; restarting tritonserver in {backoff:.0f} s")
                srv.stop()
                time.sleep(backoff)
                backoff = min(30.0, 2 * backoff)
                try:
                    srv.start(timeout)
                    started = True
                except (RuntimeError, TimeoutError) as e:  # it served before: keep trying, with backoff
                    why = f"the restart failed ({str(e).splitlines()[0]})"
            if not started:  # told to stop while restarting
                break
            self.restarts += 1
            self.up.set()
            base, healthy_since = srv.rss_kib()["tritonserver"], time.monotonic()
            self.log(f"ready again (restart {self.restarts})")
        return 0
