"""Triton Python backend: text in, generated text out, by looping over the ``mini_gpt_decode`` ONNX model (BLS).

Runs inside the Triton container (only NumPy and ``triton_python_backend_utils`` needed, no torch): the KV cache is the
decode graph's ``present_*`` outputs fed back as the next call's ``past_*`` inputs. Greedy at temperature 0, else
softmax sampling with a per-request NumPy generator (``seed``). Files next to it (written by prepare_repo.py):
``tokenizer.json`` (char tokenizer) and ``model_config.json`` (n_layer, n_kv_head, head_dim, block_size).
Docs: https://github.com/triton-inference-server/python_backend (BLS: "Business Logic Scripting").
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        here = Path(__file__).resolve().parent
        self.chars = json.loads((here / "tokenizer.json").read_text())["chars"]
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.cfg = json.loads((here / "model_config.json").read_text())
        params = json.loads(args["model_config"]).get("parameters", {})
        self.decode_model = params.get("decode_model", {}).get("string_value", "mini_gpt_decode")
        self.past_names = [f"past_{kind}_{i}" for i in range(self.cfg["n_layer"]) for kind in ("key", "value")]
        self.present_names = [n.replace("past", "present", 1) for n in self.past_names]

    def _decode(self, ids: np.ndarray, past: list) -> tuple:
        mask = np.ones((1, past[0].shape[2] + ids.shape[1]), dtype=np.int64)
        inputs = [pb_utils.Tensor("input_ids", ids), pb_utils.Tensor("attention_mask", mask)]
        inputs += [pb_utils.Tensor(n, p) for n, p in zip(self.past_names, past)]
        response = pb_utils.InferenceRequest(
            model_name=self.decode_model, inputs=inputs, requested_output_names=["logits", *self.present_names]
        ).exec()
        if response.has_error():
            raise pb_utils.TritonModelException(response.error().message())
        out = lambda name: pb_utils.get_output_tensor_by_name(response, name).as_numpy()
        return out("logits")[0, -1], [out(n) for n in self.present_names]

    def _generate(self, prompt: str, max_tokens: int, temperature: float, seed: int) -> str:
        unknown = sorted({c for c in prompt if c not in self.stoi})
        if not prompt or unknown:
            raise pb_utils.TritonModelException(f"prompt empty or has characters outside the vocabulary: {unknown}")
        ids = [self.stoi[c] for c in prompt]
        max_tokens = max(0, min(max_tokens, self.cfg["block_size"] - len(ids)))
        rng = np.random.default_rng(seed)
        shape = (1, self.cfg["n_kv_head"], 0, self.cfg["head_dim"])
        past = [np.zeros(shape, dtype=np.float32) for _ in self.past_names]
        step, out = np.array([ids], dtype=np.int64), []
        for _ in range(max_tokens):
            logits, past = self._decode(step, past)
            if temperature <= 0:
                nxt = int(np.argmax(logits))
            else:
                p = np.exp((logits - logits.max()) / temperature)
                nxt = int(rng.choice(len(p), p=p / p.sum()))
            out.append(nxt)
            step = np.array([[nxt]], dtype=np.int64)
        return "".join(self.chars[i] for i in out)

    def execute(self, requests):
        responses = []
        for request in requests:

            def scalar(name, default, request=request):
                t = pb_utils.get_input_tensor_by_name(request, name)
                return default if t is None else t.as_numpy().reshape(-1)[0]

            try:
                prompt = scalar("prompt", b"")
                prompt = prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt)
                text = self._generate(
                    prompt, int(scalar("max_tokens", 16)), float(scalar("temperature", 0.0)), int(scalar("seed", 0))
                )
                tensor = pb_utils.Tensor("text", np.array([text.encode("utf-8")], dtype=np.object_))
                responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
            except Exception as e:  # one bad request must not take the model down
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))))
        return responses

    def finalize(self):
        pass
