"""Bad input gets a clear one-line error from the command line, never a traceback."""

from __future__ import annotations

import pytest

from llama2vec.cli import main


def adapt(model, corpus, out, *flags):
    return main(["adapt", "--model", str(model), "--corpus", str(corpus), "--output", str(out),
                 "--max-steps", "1", "--batch-size", "2", "--max-length", "24", *flags])


@pytest.mark.parametrize("content, message", [
    (b'{"text": "fine"}\n{"text": oops}\n', "bad.jsonl:2: invalid JSON"),
    (b'{"title": "x"}\n', "bad.jsonl:1: missing field 'text'"),
    (b'{"text": "caf\xe9 au lait"}\n', "bad.jsonl:1: bytes that are not UTF-8"),
    (b'{"text": ""}\n{"text": "   "}\n', "no (text, next text) pairs"),
])
def test_bad_corpus(tiny_model_dir, tmp_path, capsys, content, message):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_bytes(content)
    assert adapt(tiny_model_dir, corpus, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "llama2vec_config.json").exists()
    assert not list((tmp_path / "out").rglob("meta.json"))  # no half-written pair cache


def test_missing_corpus_and_model(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    assert adapt(tiny_model_dir, tmp_path / "nope.jsonl", tmp_path / "o1") == 2
    assert "corpus file not found" in capsys.readouterr().err
    assert adapt(tmp_path / "no-model", tiny_corpus, tmp_path / "o2") == 2
    assert "model folder not found" in capsys.readouterr().err
    (tmp_path / "empty-folder").mkdir()
    assert adapt(tmp_path / "empty-folder", tiny_corpus, tmp_path / "o3") == 2
    assert "not a Hugging Face model folder" in capsys.readouterr().err


def test_hub_id_that_cannot_be_reached(tiny_corpus, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    assert adapt("no-such-org/no-such-model", tiny_corpus, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "cannot load the tokenizer of 'no-such-org/no-such-model'" in err and "Traceback" not in err


def test_output_folder_rules(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert adapt(tiny_model_dir, tiny_corpus, blocker / "out") == 2
    assert "output folder is not writable" in capsys.readouterr().err
    assert adapt(tiny_model_dir, tiny_corpus, blocker) == 2
    assert "exists and is not a folder" in capsys.readouterr().err

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert adapt(tiny_model_dir, tiny_corpus, out) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").exists()
    assert adapt(tiny_model_dir, tiny_corpus, out, "--overwrite", "--resume") == 2
    assert "exclude each other" in capsys.readouterr().err
    assert adapt(tiny_model_dir, tiny_corpus, out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "llama2vec_config.json").exists()


def test_bad_config_file(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rat: 0.1\n")
    assert adapt(tiny_model_dir, tiny_corpus, tmp_path / "o", "--config", str(cfg)) == 2
    assert "unknown option(s) in the config file: learning_rat" in capsys.readouterr().err
    cfg.write_text("- just\n- a list\n")
    assert adapt(tiny_model_dir, tiny_corpus, tmp_path / "o", "--config", str(cfg)) == 2
    assert "must be a mapping" in capsys.readouterr().err
    assert adapt(tiny_model_dir, tiny_corpus, tmp_path / "o", "--prompt-preset", "nope") == 2
    assert "prompt_preset must be one of llara, paper" in capsys.readouterr().err
