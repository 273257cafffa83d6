"""Triton python-backend model `esdllm`: diffusion-LLM generation over the esdllm runtime.

Decoupled: every request gets its responses through its own sender (one final response, or with
stream=true one response each time its decided prefix grows, then the final one with the stats:
a diffusion step may decide tokens anywhere in the block, but only the text before the first
undecided position is final, so that is what streams).

scheduler "inflight" (default): execute() validates and hands each request to the in-flight loop
and returns at once; one background thread steps the engine, admitting requests between
denoising steps and freeing their rows when they end (esdllm.runtime.inflight). scheduler
"batch": the requests the dynamic batcher handed over are decoded to the end, equal configs as one
diffusion batch, before execute() returns (the previous design, kept for comparison). A bad request
gets an error naming the problem and the others complete. Everything that is not pb_utils glue
lives in esdllm.runtime.serving and esdllm.runtime.inflight.
"""
import json
import os
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from esdllm.runtime import serving as S


FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class _AllCancelled(Exception):
    """Every client of the running batch went away: stop decoding it."""


def _bytes(s: str) -> np.ndarray:
    return np.array([[s.encode("utf-8")]], dtype=np.object_)


def _error(msg: str, invalid_arg: bool = False):
    # pb_utils.TritonError is bound by the stub after this module is imported: look it up late.
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None) if invalid_arg else None
    return pb_utils.TritonError(msg) if code is None else pb_utils.TritonError(msg, code)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        if args.get("model_instance_kind") == "GPU":  # one instance per listed GPU: this one's device
            params["device"] = f"cuda:{args['model_instance_device_id']}"
        self.pipe, self.defaults, self.limits, self.chat, self.info = S.load(params)
        self.scheduler = params.get("scheduler") or "inflight"
        self.loop = self.trimmer = None
        if self.scheduler == "batch":
            S.tune_malloc()  # as the in-flight loop does; this thread hands the heap back when idle
            self.trimmer = S.IdleTrimmer()
        if self.scheduler == "inflight":
            from esdllm.runtime.inflight import InflightLoop
            max_batch = int(config["max_batch_size"])
            self.loop = InflightLoop(self.pipe, max_batch, self.limits.max_prompt + self.limits.max_tokens,
                                     int(params.get("max_queue") or 4 * max_batch), self._send_text,
                                     lambda sender: sender.is_cancelled(), self.info,
                                     log=pb_utils.Logger.log_error, note=pb_utils.Logger.log_info,
                                     on_fatal=self._fatal).start()
        pb_utils.Logger.log_info(f"esdllm: {self.info}, scheduler {self.scheduler}, model {self.pipe.model_dir}, "
                                 f"limits {self.limits}, defaults {self.defaults}")

    def execute(self, requests):
        parsed = []
        for r in requests:
            sender = r.get_response_sender()
            inputs = {t.name(): t.as_numpy() for t in r.inputs()}  # one pass over what was sent
            try:
                S.check_parameters(r.parameters())
                req = S.parse_request(inputs, self.pipe, self.defaults, self.limits, self.chat)
            except (ValueError, TypeError) as e:
                self._send(sender, error=_error(str(e), invalid_arg=True), final=True)
                continue
            if self.loop is None:
                parsed.append((req, sender))
                continue
            refused = self.loop.submit(req, sender)  # returns at once; the engine thread answers
            if refused:
                self._send(sender, error=_error(refused), final=True)
        if parsed:
            with self.trimmer.busy():
                for cfg, group in S.group_by_config(parsed):
                    self._run(cfg, group)
        return None

    def _send_text(self, sender, text=None, stats=None, error=None, final=False) -> bool:
        return self._send(sender, text=text, stats=stats, error=None if error is None else _error(error), final=final)

    def _fatal(self, why: str) -> None:
        """The engine thread died (its clients have their errors): end this process, so the model is
        no longer served from a dead loop; the launcher's supervisor restarts the server."""
        pb_utils.Logger.log_error(f"esdllm: ending the model process: {why}")
        threading.Timer(0.5, lambda: os._exit(1)).start()

    def _run(self, cfg, group):
        queued, group = group, []
        for req, sender in queued:  # clients that left while queued take no row in the batch
            if sender.is_cancelled():
                self._send(sender, final=True)
            else:
                group.append((req, sender))
        if not group:
            return
        streams = [S.StreamText() for _ in group]
        gone = [False] * len(group)

        def on_block(ev):
            for i, (req, sender) in enumerate(group):
                gone[i] = gone[i] or sender.is_cancelled()
                if req.stream and not gone[i]:
                    delta = streams[i].delta(ev.texts[i])
                    if delta and not self._send(sender, text=delta):
                        gone[i] = True
            if all(gone):
                pb_utils.Logger.log_info(f"esdllm: every client of a batch of {len(group)} went away; "
                                         f"stopped {'after' if ev.block_done else 'in'} block {ev.block + 1} "
                                         f"of {ev.n_blocks}")
                raise _AllCancelled()
            return [i for i, g in enumerate(gone) if g]  # departed clients' rows stop decoding

        try:
            res = self.pipe.generate([req.prompt_ids for req, _ in group], cfg, on_block=on_block,
                                     stream_steps=any(req.stream for req, _ in group))
        except _AllCancelled:
            for _, sender in group:
                self._send(sender, final=True)
            return
        except Exception as e:  # one failed batch must not take the server down
            pb_utils.Logger.log_error(f"esdllm: batch of {len(group)} failed: {e!r}")
            for _, sender in group:
                self._send(sender, error=_error(f"generation failed: {e}"), final=True)
            return
        reqs = [req for req, _ in group]
        for i, ((req, sender), comp) in enumerate(zip(group, res.completions)):
            if gone[i]:
                self._send(sender, final=True)
                continue
            text = streams[i].delta(comp.text, final=True) if req.stream else comp.text
            st = S.request_stats(res.stats, comp.n_tokens, len(req.prompt_ids), reqs, self.info)
            self._send(sender, text=text, stats=st, final=True)

    def _send(self, sender, text=None, stats=None, error=None, final=False) -> bool:
        """Send one response; False when the client is gone (the batch goes on without it)."""
        resp = None
        if error is not None:
            resp = pb_utils.InferenceResponse(output_tensors=[], error=error)
        elif text is not None:
            outs = [pb_utils.Tensor("text_output", _bytes(text))]
            if stats is not None:
                outs += [pb_utils.Tensor("stats", _bytes(json.dumps(stats))),
                         pb_utils.Tensor("num_input_tokens", np.array([[stats["prompt_tokens"]]], np.int32)),
                         pb_utils.Tensor("num_output_tokens", np.array([[stats["output_tokens"]]], np.int32))]
            resp = pb_utils.InferenceResponse(output_tensors=outs)
        try:
            if resp is None:
                sender.send(flags=FINAL)
            else:
                sender.send(resp, flags=FINAL if final else 0)
            return True
        except Exception as e:  # pb_utils raises TritonModelException once the client has gone
            pb_utils.Logger.log_warn(f"esdllm: dropped a response: {e}")
            return False

    def finalize(self):
        if self.loop is not None:
            self.loop.stop()
        if self.trimmer is not None:
            self.trimmer.stop()
        self.pipe = None
