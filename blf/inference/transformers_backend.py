"""Hugging Face transformers as a backend, for GPUs without vLLM (or a CPU): one model per
worker process, built in that process from a local directory (nothing is downloaded at
run time: ``local_files_only``).

A batch is one ``generate`` call: left padding (the prompts end where generation starts),
greedy decoding, the first request's seed; each output is cut at its own request's token
cap. Float32 by default, so that batching changes the arithmetic as little as possible.
"""

from __future__ import annotations

from typing import Any

from blf.errors import InferenceError
from blf.inference import Generation

__all__ = ["TransformersBackend"]


class TransformersBackend:
    name = "transformers"

    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        device: str | None = None,
        max_tokens: int = 512,
    ) -> None:
        try:
            import torch
            import transformers
        except ImportError:
            raise InferenceError(
                "transformers is not installed: pip install 'blf[transformers]'"
            ) from None
        self._torch = torch
        self.max_tokens = int(max_tokens)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.version = f"transformers {transformers.__version__}, torch {torch.__version__}"
        try:
            self.tokenizer: Any = transformers.AutoTokenizer.from_pretrained(
                model_path, padding_side="left", local_files_only=True
            )
            model: Any = transformers.AutoModelForCausalLM.from_pretrained(
                model_path, torch_dtype=getattr(torch, dtype), local_files_only=True
            )
        except (OSError, ValueError) as exc:
            raise InferenceError(f"transformers: cannot load {model_path}: {exc}") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model: Any = model.to(self.device).eval()
        self.path = model_path

    def generate(self, requests: list[Generation]) -> list[str]:
        torch = self._torch
        caps = [min(r.max_tokens, self.max_tokens) for r in requests]
        encoded = self.tokenizer(
            [r.prompt for r in requests], return_tensors="pt", padding=True
        ).to(self.device)
        torch.manual_seed(requests[0].seed)
        with torch.no_grad():
            generated = self.model.generate(
                **encoded,
                do_sample=False,
                max_new_tokens=max(caps),
                pad_token_id=self.tokenizer.pad_token_id,
            )
        start = encoded["input_ids"].shape[1]
        return [
            self.tokenizer.decode(row[start : start + cap], skip_special_tokens=True)
            for row, cap in zip(generated, caps, strict=True)
        ]

    def describe(self) -> str:
        return f"{self.version}, {self.path}, greedy, {self.device}"
