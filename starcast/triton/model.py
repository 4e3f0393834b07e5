"""A Triton Inference Server model that serves a starcast export (Python backend, decoupled: tokens stream back as
they are generated). Written into the model repository by `starcast triton-repo`.

Each model instance runs one starcast engine (runtime/engine.py), so concurrent requests share one continuously
batched loop. Inputs: `prompt` (text) or `prompt_ids` (token ids), optional `suffix` (fill-in-the-middle),
`max_tokens`, `temperature` (0: greedy), `top_p`, `top_k`, `repetition_penalty`, `seed`, `stop`. Each response
carries `text` (the new piece), `token_ids` (the new token), `finished` and `finish_reason`; the last one has
Triton's final flag.
"""

import json
import site
from pathlib import Path

# Where starcast is installed, written by starcast triton-repo: Triton's Python stub may not look there.
SITE_PACKAGES: list = []
for _path in SITE_PACKAGES:
    if Path(_path).is_dir():
        site.addsitedir(_path)  # with its .pth files (editable installs)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from starcast.contract.errors import UserError  # noqa: E402
from starcast.runtime.engine import Engine  # noqa: E402
from starcast.runtime.requests import FINISH_ERROR, Event, Request  # noqa: E402
from starcast.runtime.sampling import openai_style  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def scalar(request, name: str, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else tensor.as_numpy().reshape(-1)[0].item()


def strings(request, name: str) -> list[str] | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in tensor.as_numpy().reshape(-1)]


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"] / parameters["export"]
        on_gpu = args["model_instance_kind"] == "GPU"
        self.engine = Engine.from_export(
            folder, max_batch=int(parameters["max_batch"]), max_queue=int(parameters["max_queue"]),
            provider="cuda" if on_gpu else "cpu", device_id=int(args["model_instance_device_id"]) if on_gpu else 0,
        )  # fmt: skip
        if self.engine.tokenizer is None:
            raise pb_utils.TritonModelException(f"{folder}: the export has no tokenizer.json")
        self.engine.start()

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.engine.submit(self.engine_request(request, sender))
            except Exception as exc:  # this request's inputs; the next requests are still served
                message = (
                    str(exc) if isinstance(exc, (UserError, ValueError, TypeError)) else f"{type(exc).__name__}: {exc}"
                )
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)
        return None

    def engine_request(self, request, sender) -> Request:
        tokenizer = self.engine.tokenizer
        prompt, suffix = strings(request, "prompt"), strings(request, "suffix")
        ids = pb_utils.get_input_tensor_by_name(request, "prompt_ids")
        if (prompt is None) == (ids is None):
            raise UserError("give exactly one of the inputs prompt (text) and prompt_ids (token ids)")
        if prompt is not None:
            text = tokenizer.fim_prompt(prompt[0], suffix[0]) if suffix else prompt[0]
            ids = np.asarray(tokenizer.encode(text), np.int64)
        else:
            ids = ids.as_numpy().reshape(-1).astype(np.int64)
        sampling = openai_style(
            float(scalar(request, "temperature", 0.0)),
            top_p=float(scalar(request, "top_p", 1.0)),
            top_k=int(scalar(request, "top_k", 0)),
            repetition_penalty=float(scalar(request, "repetition_penalty", 1.0)),
            seed=scalar(request, "seed", None),
        )
        stop = strings(request, "stop") or []

        def on_event(event: Event) -> None:  # in the engine's thread
            if request.is_cancelled():  # the client went away: free the row at the next step
                generation.cancel()
            if event.finish_reason == FINISH_ERROR:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(event.error)), flags=FINAL)
                return
            finished = event.finish_reason is not None
            outputs = [
                pb_utils.Tensor("text", np.array([event.text.encode("utf-8")], dtype=np.object_)),
                pb_utils.Tensor("token_ids", np.array([] if event.token is None else [event.token], np.int64)),
                pb_utils.Tensor("finished", np.array([finished])),
                pb_utils.Tensor("finish_reason", np.array([(event.finish_reason or "").encode()], dtype=np.object_)),
            ]
            sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL if finished else 0)

        generation = Request(ids, int(scalar(request, "max_tokens", 16)), sampling, stop, on_event)
        return generation

    def finalize(self) -> None:
        self.engine.stop(grace=5.0)
