"""`esdllm serve`: run a real Triton Inference Server on the esdllm model repository.

find_tritonserver   --tritonserver PATH, else `tritonserver` on PATH, else the one inside the
                    nvidia-pytriton wheel (python backend only; see DESIGN.md §2)
repo_values         the ${name} values of triton_repo/esdllm/config.pbtxt, from engine.json + flags
write_repository    copy triton_repo/esdllm into a model repository and fill its config
TritonServer        start (loopback only by default), wait until the model is ready, stop cleanly
register            adds the `serve` subcommand to the esdllm CLI
"""
from __future__ import annotations

import importlib.resources
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .config import DTYPES, DecodeConfig

REPO_TEMPLATE = Path(str(importlib.resources.files("esdllm") / "triton_repo"))  # shipped as package data
MODEL_NAME = "esdllm"
_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


RAW_VALUES = ("inputs",)  # placeholders filled with protobuf text as it is (generated, not user text)


def fill_template(text: str, values: dict[str, object]) -> str:
    """Replace every ${name}; values are escaped for a double-quoted protobuf text string, except
    RAW_VALUES, which are blocks of config text."""
    missing = sorted({m for m in _PLACEHOLDER.findall(text) if m not in values})
    if missing:
        raise ValueError(f"config template needs values for {', '.join(missing)}")
    esc = {k: str(v) if k in RAW_VALUES else str(v).replace("\\", "\\\\").replace('"', '\\"')
           for k, v in values.items()}
    return _PLACEHOLDER.sub(lambda m: esc[m.group(1)], text)


def repo_values(artifacts: str | Path | None = None, model: str | Path | None = None, *, executor: str = "auto",
                device: str = "auto", dtype: str | None = None, max_batch: int | None = None,
                max_tokens: int | None = None, max_prompt: int | None = None, queue_delay_us: int = 5000,
                chat: bool = False, decode: dict | None = None, model_name: str = MODEL_NAME) -> dict:
    """Values for config.pbtxt. The artifacts' build profile (engine.json) sets the batch, gen and
    prompt limits and the default block length unless a flag overrides them."""
    build, hf_dir = None, None
    if artifacts is not None:
        from .artifacts import EngineSpec
        spec = EngineSpec.read(artifacts)
        build = spec.build
        hf_dir = spec.root / spec.hf_dir if spec.hf_dir else None  # tokenizer + config copied by the build
    decode = dict(decode or {})
    base = DecodeConfig()
    max_batch = max_batch or (build.max_batch if build else 8)
    max_tokens = max_tokens or (build.gen_length if build else max(base.gen_length, decode.get("gen_length", 0)))
    if "block_length" not in decode and build:
        decode["block_length"] = build.block_length
    block = decode.get("block_length", base.block_length)
    decode.setdefault("gen_length", max(block, min(base.gen_length, max_tokens) // block * block))
    cfg = DecodeConfig(**decode)  # fail here, at the command line, rather than in the server
    if cfg.gen_length > max_tokens:
        raise ValueError(f"default gen length {cfg.gen_length} exceeds the served limit max_tokens {max_tokens}")
    model_dir = model or hf_dir
    from .serving import config_inputs
    return {"model_name": model_name, "max_batch_size": max_batch, "max_queue_delay_us": queue_delay_us,
            "inputs": config_inputs(),
            "model_dir": str(Path(model_dir).resolve()) if model_dir else "",
            "artifacts_dir": str(Path(artifacts).resolve()) if artifacts else "",
            "executor": executor, "device": device, "dtype": dtype or "", "max_tokens_limit": max_tokens,
            "max_prompt_tokens": max_prompt or (build.max_prompt if build else 0),
            "chat": "true" if chat else "false", "decode_defaults": json.dumps(cfg.to_dict())}


def write_repository(out: str | Path, values: dict, template: Path = REPO_TEMPLATE) -> Path:
    """A ready model repository at `out`: <out>/<model_name>/{config.pbtxt, 1/...}."""
    src, dst = template / MODEL_NAME, Path(out) / values["model_name"]
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


class TritonServer:
    """One tritonserver process on `values`' model repository. Use as a context manager, or
    start() / stop(). Logs go to `log` (a file path) or are inherited when log is None."""

    def __init__(self, values: dict, *, host: str = "127.0.0.1", grpc_port: int = 8001, http_port: int = 8000,
                 tritonserver: str | None = None, log: str | Path | None = None, extra_args: tuple = ()):
        self.values, self.host, self.grpc_port, self.http_port = values, host, grpc_port, http_port
        self.binary, self.from_wheel = find_tritonserver(tritonserver)
        self.log, self.extra_args = log, tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self.work: Path | None = None
        self._log_file = None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def command(self, repo: Path, backend_dir: Path | None) -> list[str]:
        cmd = [str(self.binary), f"--model-repository={repo}", f"--http-address={self.host}",
               f"--grpc-address={self.host}", f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
               "--allow-metrics=false", "--exit-timeout-secs=10"]
        if backend_dir is not None:
            cmd.append(f"--backend-directory={backend_dir}")
        return cmd + list(self.extra_args)

    def environment(self, libs: list[str]) -> dict[str, str]:
        env = dict(os.environ)
        # The wheel's stub runs an isolated interpreter (PYTHONPATH and other PYTHON* variables are
        # ignored); it finds its environment, and so esdllm, through the `python3` first on PATH.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
        return env

    def start(self, timeout: float = 180.0) -> "TritonServer":
        self.work = Path(tempfile.mkdtemp(prefix="esdllm-triton-"))
        try:
            repo = write_repository(self.work / "models", self.values)
            backend_dir, libs = wheel_backend_dir(self.work) if self.from_wheel else (None, [])
            out = None
            if self.log is not None:
                self._log_file = out = open(self.log, "ab")
            self.proc = subprocess.Popen(self.command(repo, backend_dir), env=self.environment(libs),
                                         stdout=out, stderr=subprocess.STDOUT if out else None,
                                         start_new_session=True)  # Ctrl-C reaches us; we stop it in order
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        url = f"{self.http_url}/v2/models/{self.values['model_name']}/ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.proc.returncode} before it was ready"
                                   + self._log_tail())
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"tritonserver was not ready after {timeout:.0f} s" + self._log_tail())

    def _log_tail(self, n: int = 12) -> str:
        if self.log is None or not Path(self.log).is_file():
            return ""
        lines = Path(self.log).read_text(errors="replace").splitlines()
        errors = [ln[:2000] for ln in lines if re.match(r"E\d{4} ", ln)]  # Triton's error lines
        return (f"\n--- tritonserver log {self.log}: the last {n} lines, then the errors ---\n"
                + "\n".join(lines[-n:] + errors[-5:]))

    def stop(self, timeout: float = 20.0) -> None:
        """SIGINT (Triton unloads the model and exits), then SIGKILL to the whole process group
        (the server and its python stubs) if it does not go in time."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc is not None:
            try:  # stubs left behind by a crashed server
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
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


def _decode_overrides(ns) -> dict:
    """The decoding flags the user really gave (their parser defaults are None)."""
    names = DecodeConfig.__dataclass_fields__
    return {k: v for k, v in vars(ns).items() if k in names and v is not None}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _serve(ns) -> int:
    values = repo_values(ns.artifacts, ns.model, executor=ns.executor, device=ns.device, dtype=ns.dtype,
                         max_batch=ns.max_batch, max_tokens=ns.max_tokens, max_prompt=ns.max_prompt,
                         queue_delay_us=ns.queue_delay_us, chat=ns.chat, decode=_decode_overrides(ns))
    if ns.write_repo:
        out = write_repository(ns.write_repo, values)
        print(f"wrote the model repository to {out} (tritonserver --model-repository={out})")
        return 0
    server = TritonServer(values, host=ns.host, grpc_port=ns.grpc_port, http_port=ns.http_port,
                          tritonserver=ns.tritonserver)
    print(f"esdllm serve: starting {server.binary}", file=sys.stderr)
    for sig in (signal.SIGINT, signal.SIGTERM):  # both stop cleanly, also when started in the background
        signal.signal(sig, _interrupt)
    try:
        server.start(ns.timeout)
        print(f"esdllm serve: ready: gRPC {server.grpc_url}, HTTP {server.http_url}, model "
              f"{values['model_name']!r}; Ctrl-C stops", file=sys.stderr)
        while server.proc.poll() is None:
            time.sleep(0.5)
        print(f"esdllm serve: tritonserver exited with code {server.proc.returncode}", file=sys.stderr)
        return server.proc.returncode or 1
    except KeyboardInterrupt:
        print("esdllm serve: stopping", file=sys.stderr)
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"esdllm serve: error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        server.stop()


def register(subparsers) -> None:
    """Adds `esdllm serve`."""
    from .flags import add_decode_args
    p = subparsers.add_parser("serve", help="serve the model through Triton Inference Server (gRPC + HTTP)")
    p.add_argument("--artifacts", default=None, help="artifacts dir from `esdllm build` (engine.json)")
    p.add_argument("--model", default=None, help="HF checkpoint dir (default: the artifacts' checkpoint, "
                   "else the embedded models/llada-tiny)")
    p.add_argument("--executor", default="auto", choices=["auto", "torch", "onnxruntime", "tensorrt"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=None, choices=DTYPES)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--tritonserver", default=None, help="tritonserver binary (default: PATH, else nvidia-pytriton's)")
    p.add_argument("--max-batch", type=int, default=None, help="max_batch_size (default: the artifacts' or 8)")
    p.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens served (default: the "
                   "artifacts' gen length)")
    p.add_argument("--max-prompt", type=int, default=None, help="longest prompt in tokens (default: the "
                   "artifacts' or the model's max length minus --max-tokens)")
    p.add_argument("--queue-delay-us", type=int, default=5000, help="dynamic batcher max queue delay")
    p.add_argument("--chat", action="store_true", help="apply the chat template unless a request says otherwise")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server to be ready")
    p.add_argument("--write-repo", default=None, metavar="DIR",
                   help="only write the filled model repository to DIR (for your own tritonserver) and exit")
    add_decode_args(p)
    p.set_defaults(**{k: None for k in DecodeConfig.__dataclass_fields__}, func=_serve)
