"""ONNX export of Hugging Face encoders (bare or with a task head) and ONNX Runtime
sessions, shared by `distill export --onnx` and the report's ONNX checks.

The exporter is torch's dynamo-based ``torch.onnx.export(..., dynamo=True)`` (it needs
``onnxscript``): with torch 2.13 and transformers 5.23 it gives outputs equal to eager
PyTorch to ~1e-6, where the legacy TorchScript exporter's graph of BERT's embeddings
(buffered token type ids) was off by O(1). Batch and sequence axes are dynamic. The
graph's inputs are the tokenizer's ``model_input_names`` (``input_ids``,
``attention_mask`` and, for BERT, ``token_type_ids``), so a tokenizer's output feeds it
as it is.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from distill_common.errors import DistillUserError

log = logging.getLogger(__name__)

ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_EXTRA = "pip install 'distill-encoders[onnx]' (onnx, onnxruntime, onnxscript)"
# Above this, weights go to a side file (protobuf's 2 GiB limit).
_EXTERNAL_DATA_BYTES = 1536 * 2**20


class OnnxUserError(DistillUserError, RuntimeError):
    """ONNX export or inference is not possible here; the message says why and the fix."""


def require_onnx() -> None:
    """An error naming the missing packages and the fix, before any work is done."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime", "onnxscript")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise OnnxUserError(f"ONNX export needs {', '.join(missing)}: {_EXTRA}")


class _NamedInputs(nn.Module):
    """Positional ONNX inputs -> the model's keyword arguments; one named output."""

    def __init__(self, model: nn.Module, input_names: Sequence[str], output: str):
        super().__init__()
        self.model, self.input_names, self.output = model, tuple(input_names), output

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(**dict(zip(self.input_names, inputs))), self.output)


def onnx_input_names(tokenizer) -> list[str]:
    """The tokenizer's inputs that an encoder's forward takes, in a fixed order."""
    return [n for n in ONNX_INPUTS if n in tokenizer.model_input_names]


def example_inputs(input_names: Sequence[str], vocab_size: int) -> tuple[torch.Tensor, ...]:
    """Two rows of 8 tokens, the second padded: the traced graph must take both paths of
    the attention mask (a batch without padding may be specialised away)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(min(5, vocab_size - 1), vocab_size, (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    by_name = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return tuple(by_name[n] for n in input_names)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter reports progress on stdout, warns about internals and logs that
    torchvision's operators are skipped; our log says what was written."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        registration.setLevel(level)


def export_onnx(model: nn.Module, path: Path, input_names: Sequence[str], output: str,
                vocab_size: int) -> Path:
    """Write ``model`` (eval mode, fp32) to ``path`` with dynamic batch and sequence axes;
    its one output is ``model(...).<output>`` (``last_hidden_state`` or ``logits``)."""
    require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = _NamedInputs(model.float().eval(), input_names, output)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    with _quiet_exporter():
        torch.onnx.export(wrapped, example_inputs(input_names, vocab_size), str(path),
                          input_names=list(input_names), output_names=[output],
                          dynamic_shapes=(tuple({0: batch, 1: seq} for _ in input_names),),
                          dynamo=True, external_data=size > _EXTERNAL_DATA_BYTES,
                          verbose=False)
    log.info("ONNX: %s (%.1f MiB)", path, path.stat().st_size / 2**20)
    return path


def quantize_int8(source: Path, target: Path) -> Path:
    """Dynamic int8 quantisation (weights int8, activations quantised at run time) with
    ONNX Runtime: the usual CPU serving variant of a transformer encoder."""
    require_onnx()
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with warnings.catch_warnings(), tempfile.TemporaryDirectory(dir=Path(target).parent) as tmp:
        warnings.simplefilter("ignore")
        # ORT's pre-processing (shape inference, constant folding) first: without it the
        # int8 file kept the fp32 weights beside the int8 ones (larger than fp32). Its
        # symbolic shape inference does not follow the dynamo graph; ONNX's own does.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8)
    log.info("ONNX int8: %s (%.1f MiB)", target, Path(target).stat().st_size / 2**20)
    return Path(target)


def ort_session(path: Path, threads: int | None = None):
    """A CPU ONNX Runtime session; ``threads`` intra-op threads (None: ORT's default)."""
    require_onnx()
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_feed(session, batch: dict[str, torch.Tensor]) -> dict:
    """The session's inputs from a batch of int64 tensors (token type ids default to 0)."""
    names = [i.name for i in session.get_inputs()]
    feed = {}
    for name in names:
        value = batch.get(name)
        if value is None and name == "token_type_ids":
            value = torch.zeros_like(batch["input_ids"])
        if value is None:
            raise OnnxUserError(f"the ONNX model needs input {name!r}, the batch has "
                                f"{sorted(batch)}")
        feed[name] = value.to(torch.int64).numpy()
    return feed


def export_encoder(model_dir: Path, onnx_dir: Path, int8: bool = False) -> list[Path]:
    """``onnx_dir/model.onnx`` (the bare encoder of the folder, as ``AutoModel`` loads it,
    output ``last_hidden_state``) and, with ``int8``, ``onnx_dir/model_int8.onnx``."""
    from transformers import AutoModel, AutoTokenizer

    from distill_common.hf_quiet import quiet_hf_loading

    require_onnx()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with quiet_hf_loading():  # a folder without pooler is fine: the graph does not use it
        model = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    path = export_onnx(model, Path(onnx_dir) / "model.onnx", onnx_input_names(tokenizer),
                       "last_hidden_state", model.config.vocab_size)
    return [path] + ([quantize_int8(path, path.with_name("model_int8.onnx"))] if int8 else [])
