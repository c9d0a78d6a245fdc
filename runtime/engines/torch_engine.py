"""The PyTorch engine: the model's own stages (``cavmae.stages``) run eagerly on CPU or CUDA.

It runs the very modules the exporter traces, so it needs the weights: a model object, or the
checkpoint an export was made from. On CUDA it can run under fp16 or bf16 autocast, on the CPU
under bf16 (oneDNN's AVX512_BF16 kernels where the CPU has them).
torch is imported only when this engine is created.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cavmae.errors import EngineUnavailableError
from cavmae.manifest import TORCH_PRECISIONS, GraphSpec, Manifest
from cavmae.masking import DEFAULT_MASK_RATIO
from cavmae.modes import finetune_mode_of

from .base import Engine, GraphSession
from .devices import parse_device

PRECISIONS = TORCH_PRECISIONS


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise EngineUnavailableError(
            "the torch engine needs PyTorch: pip install torch (or use --engine ort)"
        ) from None
    return torch


class TorchSession(GraphSession):
    def __init__(self, spec: GraphSpec, stage: Any, device: str, autocast: Any) -> None:
        super().__init__(spec)
        self.stage, self.device, self.autocast = stage, device, autocast

    def _run(self, inputs: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        torch = _import_torch()
        args = [torch.from_numpy(inputs[t.name]).to(self.device) for t in self.spec.inputs]
        with torch.inference_mode():
            if self.autocast is not None:
                kind = "cuda" if str(self.device).startswith("cuda") else "cpu"  # bf16: oneDNN on CPU
                with torch.autocast(device_type=kind, dtype=self.autocast):
                    out = self.stage.module(*args)
            else:
                out = self.stage.module(*args)
        out = out if isinstance(out, tuple) else (out,)
        return {t.name: o.float().cpu().numpy() for t, o in zip(self.spec.outputs, out, strict=True)}


class TorchEngine(Engine):
    """Runs ``cavmae.stages`` modules; ``precision`` fp16 (CUDA) or bf16 (CUDA or CPU) means autocast."""

    name = "torch"

    def __init__(
        self,
        export_dir: str | Path | None,
        manifest: Manifest,
        device: str = "cpu",
        *,
        model: Any = None,
        precision: str = "fp32",
    ) -> None:
        parse_device(device)  # an unknown device is one line here, not an error inside torch
        super().__init__(export_dir or ".", manifest, device)
        torch = _import_torch()
        from cavmae.checkpoint import load_checkpoint
        from cavmae.stages import build_stages

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineUnavailableError("the torch engine on cuda needs a CUDA GPU and a CUDA build of PyTorch")
        if precision not in PRECISIONS:
            raise EngineUnavailableError(f"torch precision must be one of {', '.join(PRECISIONS)}")
        if precision == "fp16" and not device.startswith("cuda"):
            raise EngineUnavailableError("torch fp16 autocast needs --device cuda (bf16 runs on the CPU too)")
        if model is None:
            checkpoint = manifest.source.get("checkpoint")
            if not checkpoint or not Path(checkpoint).is_file():
                raise EngineUnavailableError(
                    "the torch engine needs the model weights, and this export's source checkpoint"
                    f" ({checkpoint or 'unknown'}) is not available: give the checkpoint or model"
                    " name instead of the export directory, or use --engine ort"
                )
            model = load_checkpoint(checkpoint)
        self.model = model.to(device).eval()
        self.precision = precision
        self._autocast = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        m = manifest
        self._stages = build_stages(
            self.model,
            num_frames=m.num_frames,
            max_batch=m.max_batch,
            task=m.task or "multi-label",
            finetune_mode=finetune_mode_of(m.modes),
            mask_ratio_a=m.mask_ratio_a if m.mask_ratio_a is not None else DEFAULT_MASK_RATIO,
            mask_ratio_v=m.mask_ratio_v if m.mask_ratio_v is not None else DEFAULT_MASK_RATIO,
        )

    def _open(self, spec: GraphSpec) -> GraphSession:
        return TorchSession(spec, self._stages[spec.name], self.device, self._autocast)

    def describe(self) -> str:
        return f"torch {self.precision} on {self.device}"
