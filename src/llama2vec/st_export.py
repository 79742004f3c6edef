"""`llama2vec export --format sentence-transformers`: a folder that sentence-transformers opens on its own.

`SentenceTransformer(folder, trust_remote_code=True)` loads it without llama2vec installed, and its
`encode_query` / `encode_document` give the embeddings of `Llama2Vec.encode_queries` /
`encode_corpus`. The folder is a model folder (the model and tokenizer with their placeholder tokens,
and `llama2vec_config.json`, so llama2vec opens it too) plus the sentence-transformers files:

    modules.json                       # llama2vec_st.Llama2VecTransformer, PlaceholderPooling, Normalize
    config_sentence_transformers.json  # empty query/document prompts, cosine similarity
    sentence_bert_config.json          # prompt token ids and the length limits of T
    llama2vec_st.py                    # the two custom modules (a copy of llama2vec/st_module.py)
    1_Pooling/config.json              # K and the pooling (mean | last)
    2_Normalize/config.json
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .card import EVALUATIONS, TRAINING, write_card
from .errors import Llama2VecError
from .prompts import KINDS, text_rule
from .store import atomic_folder, ensure_folder, write_json

MODULE_FILE = "llama2vec_st.py"
MODULE_SOURCE = Path(__file__).with_name("st_module.py")


def export_sentence_transformers(model: str, output: str | Path, device: str = "cpu") -> Path:
    """Write the sentence-transformers folder of `model` (a llama2vec model folder, or any causal LM
    with the llara prompt, as `Llama2Vec.from_pretrained` opens it) to `output`, atomically. An
    `output` that exists must be an earlier export: it is replaced."""
    import sentence_transformers
    import torch
    import transformers

    from .encoder import Llama2Vec
    from .models import save_model_folder

    output = Path(output)
    if output.exists() and not (output / MODULE_FILE).is_file():
        raise Llama2VecError(f"{output}: exists and is not a sentence-transformers export (no {MODULE_FILE}): "
                             f"choose another --output")
    encoder = Llama2Vec.from_pretrained(model, device=device, dtype="float32")
    spec, ids = encoder.spec, encoder.ids
    (query_length, query_task), (document_length, document_task) = (text_rule(spec, k) for k in KINDS)
    suffix = {"next": ids.next_suffix, "self": ids.self_suffix}  # the module keeps its own copy of the rule
    pad_id = encoder.tokenizer.pad_token_id
    transformer = {
        "transformer_task": "feature-extraction",
        "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        "module_output_name": "token_embeddings",
        "unpad_inputs": False,  # the placeholders must close every (left-padded) row
        "query_length": query_length,
        "document_length": document_length,
        "bos_ids": ids.bos,
        "prefix_ids": ids.prefix,
        "query_suffix_ids": suffix[query_task],
        "document_suffix_ids": suffix[document_task],
        "pad_token_id": pad_id,
    }
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": f"{Path(MODULE_FILE).stem}.Llama2VecTransformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": f"{Path(MODULE_FILE).stem}.PlaceholderPooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.base.modules.Normalize"},
    ]
    st_config = {
        "model_type": "SentenceTransformer",
        "__version__": {"sentence_transformers": sentence_transformers.__version__,
                        "transformers": transformers.__version__, "pytorch": torch.__version__},
        "requirements": {"sentence-transformers": ">=6.0"},
        "prompts": {"query": "", "document": ""},  # the prompts are token ids in sentence_bert_config.json
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }
    with atomic_folder(output) as tmp:
        save_model_folder(encoder.model, encoder.tokenizer, spec, tmp)
        shutil.copyfile(MODULE_SOURCE, tmp / MODULE_FILE)
        write_json(tmp / "sentence_bert_config.json", transformer)
        write_json(tmp / "config_sentence_transformers.json", st_config)
        write_json(ensure_folder(tmp / "1_Pooling") / "config.json", {"num_placeholders": ids.k,
                                                                      "pooling": spec.pooling})
        write_json(ensure_folder(tmp / "2_Normalize") / "config.json",
                   {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"})
        write_json(tmp / "modules.json", modules)
        source = Path(encoder.source or "")
        for name in ("run_config.yaml", TRAINING, EVALUATIONS):  # the card tells what the model is
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
        write_card(tmp, name=output.name, exported_from=str(model))
    return output
