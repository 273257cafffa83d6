"""Triton python-backend model `noop`: reads each request's inputs as esdllm's model does and sends
one final, empty response through its sender (decoupled). Its round trip is the floor bench-serve
reports under esdllm's batch-1 overhead."""
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for r in requests:
            sender = r.get_response_sender()
            {t.name(): t.as_numpy() for t in r.inputs()}  # as esdllm's execute() reads them
            out = pb_utils.Tensor("text_output", np.array([[b""]], dtype=np.object_))
            sender.send(pb_utils.InferenceResponse(output_tensors=[out]),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
