"""Reduced-precision CPU encoding: the decoder exported to ONNX, its linear layers' weights
quantised to 8 bits in blocks along the input dimension (ONNX Runtime's MatMulNBits, one scale per
block of `BLOCK` weights), and run by ONNX Runtime with int8 arithmetic (accuracy level 4: the
activations are quantised per block at run time too, so one outlier feature does not cost the
precision of a whole row). Attention products, norms and the embedding table stay float32.

`Llama2Vec.from_pretrained(..., backend="onnx-int8")` and `llama2vec encode/evaluate --backend
onnx-int8` use it. The export is made once per model folder and prompt length K and cached under
the llama2vec cache (see `models.cache_dir`), written to a temporary name and renamed, so a killed
export leaves nothing that looks finished.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .errors import Llama2VecError
from .losses import last_states
from .models import cache_dir
from .store import fingerprint, fingerprint_key, model_identity, read_json_or_none, scratch_folder, write_json

log = logging.getLogger(__name__)
FORMAT_VERSION = 3  # bump when the exported graph or the quantisation recipe changes
BITS, BLOCK = 8, 128


class _LastStates(torch.nn.Module):
    """Decoder forward -> the last K hidden states (B, K, H): all that pooling reads."""

    def __init__(self, decoder: torch.nn.Module, k: int):
        super().__init__()
        self.decoder, self.k = decoder, k

    def forward(self, input_ids, attention_mask, position_ids):
        return last_states(self.decoder, input_ids, position_ids, attention_mask, self.k)


def weight_matmuls(model) -> list[str]:
    """Names of the MatMul nodes that multiply by a weight (an initializer): the linear layers, in
    an ONNX model or file. The attention products (activation x activation) stay in float32."""
    import onnx

    graph = (onnx.load(str(model), load_external_data=False) if isinstance(model, (str, Path)) else model).graph
    weights = {init.name for init in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and any(i in weights for i in n.input)]


def export(decoder: torch.nn.Module, k: int, pad_id: int, output: Path, quantise: bool = True) -> Path:
    """Export `decoder` (a Hugging Face base model, float32, CPU) to `output` (an .onnx file),
    int8-quantised unless `quantise` is False. Atomic: the file appears only when finished."""
    module = _LastStates(decoder.float().cpu(), k).eval()
    # Two rows of different lengths (left-padded) so that neither dimension is specialised.
    ids = torch.full((2, 12), pad_id, dtype=torch.long)
    ids[:, 4:] = 7
    ids[1, 4:] = 11
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    dims = {name: {0: batch, 1: length} for name in ("input_ids", "attention_mask", "position_ids")}
    with scratch_folder(output.parent, "export") as tmp:
        plain = Path(tmp) / "model-fp32.onnx"
        with torch.no_grad():
            torch.onnx.export(module, (ids, mask, positions), str(plain), dynamo=True, dynamic_shapes=dims,
                              input_names=list(dims), output_names=["states"], external_data=False, verbose=False)
        final = plain
        if quantise:
            import onnx
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                DefaultWeightOnlyQuantConfig,
                MatMulNBitsQuantizer,
            )

            final = Path(tmp) / "model-int8.onnx"
            logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
            recipe = dict(bits=BITS, block_size=BLOCK, is_symmetric=True, accuracy_level=4)
            graph = onnx.load(str(plain))
            quantizer = MatMulNBitsQuantizer(graph, nodes_to_include=weight_matmuls(graph),
                                             algo_config=DefaultWeightOnlyQuantConfig(**recipe), **recipe)
            quantizer.process()
            quantizer.model.save_model_to_file(str(final), use_external_data_format=False)
        os.replace(final, output)
    return output


def cached_export(model_path: str, decoder: torch.nn.Module, k: int, pad_id: int, quantise: bool = True,
                  tokens: list[str] | None = None) -> Path:
    """The cached export of the model folder `model_path`, exported on first use. Its folder is named
    by a hash of its fingerprint (the model folder's identity, the placeholder `tokens` added to it, K
    and the recipe), which `fingerprint.json` beside it records; an export whose record differs is
    made again."""
    fp = fingerprint(model=model_identity(model_path), tokens=tokens or [], k=k, quantise=quantise,
                     format=FORMAT_VERSION)
    path = cache_dir() / "onnx" / fingerprint_key(fp) / "model.onnx"
    record = path.parent / "fingerprint.json"
    if path.is_file() and read_json_or_none(record) != fp:
        log.info("%s: made from another model or options: exported again", path)
        path.unlink()
    if not path.is_file():
        log.info("exporting %s to ONNX%s (once): %s", model_path, " int8" if quantise else "", path)
        try:
            export(decoder, k, pad_id, path, quantise)
        except Exception as err:  # the exporter's own errors are long; name the step that failed
            shutil.rmtree(path.parent, ignore_errors=True)
            raise Llama2VecError(f"{model_path}: ONNX export failed: {err}") from err
        write_json(record, fp)
    return path


class OnnxDecoder:
    """Callable like `decoder_states` restricted to the last K positions, run by ONNX Runtime."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = path

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor) -> torch.Tensor:
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy(),
                 "position_ids": position_ids.numpy()}
        return torch.from_numpy(np.asarray(self.session.run(None, feeds)[0]))
