"""A team's own architecture: Python source + a factory, built only where code is trusted.

A code model is described as data (`CodeSpec`: the factory `module:function`, its JSON
keyword arguments, the input shape and class count) next to a folder of source files (one
`.py`, or a small package). Models are programs: `build_code_model` imports that source, so
call it only for code you trust (the CLI asks for `--trust-code`, `load_model_dir` for
`trust_code=True`, the service runs it only in a worker's job process).

    spec = CodeSpec(factory="mynet:build", kwargs={"width": 16}, input_shape=(1, 8, 8),
                    num_classes=10)
    model = build_code_model(spec, "path/to/code")      # imports path/to/code/mynet.py
    dest = copy_code("mynet.py", "out/code")            # a .py, a .zip or a folder

Import-time side effects stay in this process; the modules the code adds to `sys.modules` are
removed again after the factory returns, so two code models with one module name do not mix.
"""

from __future__ import annotations

import importlib
import re
import shutil
import sys
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mipp.errors import ModelError

CODE_DIR = "code"  # folder of a model directory that holds the source
FACTORY_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
MAX_CODE_FILES = 200
MAX_CODE_BYTES = 5 * 2**20  # uncompressed source of one model


class CodeSpec(BaseModel):
    """A model built by calling `factory(**kwargs)` from user source; shareable as JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field("code", pattern="^code$")
    factory: str = Field(description="module:function, e.g. 'mynet:build'")
    kwargs: dict[str, Any] = {}
    input_shape: tuple[int, ...]
    num_classes: int

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, value: str) -> str:
        if not FACTORY_PATTERN.match(value):
            raise ValueError(f"factory must look like 'module:function' (e.g. 'mynet:build'), "
                             f"got {value!r}")
        return value

    @property
    def module(self) -> str:
        return self.factory.split(":")[0]

    @property
    def function(self) -> str:
        return self.factory.split(":")[1]

    def build(self, code_dir: str | Path, seed: int | None = None):
        """`build_code_model(self, code_dir, seed)`: imports the code; raises ModelError."""
        return build_code_model(self, code_dir, seed=seed)


def safe_members(archive: zipfile.ZipFile, what: str) -> list[zipfile.ZipInfo]:
    """The files of a code .zip, refusing absolute paths, `..`, links and size bombs."""
    members, total = [], 0
    for info in archive.infolist():
        if info.is_dir():
            continue
        path = PurePosixPath(info.filename)
        if path.is_absolute() or ".." in path.parts or "\\" in info.filename:
            raise ModelError(f"{what}: member {info.filename!r} points outside the archive; "
                             "zip the package folder with relative paths")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise ModelError(f"{what}: member {info.filename!r} is a symbolic link; "
                             "zip plain files only")
        total += info.file_size
        members.append(info)
    if len(members) > MAX_CODE_FILES or total > MAX_CODE_BYTES:
        raise ModelError(f"{what}: {len(members)} files, {total} bytes uncompressed; a model's "
                         f"source may hold at most {MAX_CODE_FILES} files and "
                         f"{MAX_CODE_BYTES // 2**20} MiB")
    return members


def copy_code(source: str | Path, dest: str | Path) -> Path:
    """Copy model source (a .py file, a .zip of a package, or a folder) into folder `dest`.

    Raises ModelError for a missing file, another suffix, or an unsafe zip.
    """
    source, dest = Path(source), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, dest, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    elif source.suffix == ".py" and source.is_file():
        shutil.copy2(source, dest / source.name)
    elif source.suffix == ".zip" and source.is_file():
        with zipfile.ZipFile(source) as archive:
            for info in safe_members(archive, source.name):
                target = dest / info.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(info))
    else:
        raise ModelError(f"model code {str(source)!r} must be an existing .py file, a .zip of a "
                         "package, or a folder")
    return dest


def build_code_model(spec: CodeSpec, code_dir: str | Path, seed: int | None = None):
    """Import `spec.module` from `code_dir`, call the factory, check it returns an nn.Module.

    The returned model carries `zoo_spec` (the spec) and `code_dir`. Raises ModelError naming
    the factory for an import error, a missing function, an exception in the factory or a
    result that is not an nn.Module.
    """
    import torch
    from torch import nn

    code_dir = Path(code_dir).resolve()
    if not code_dir.is_dir():
        raise ModelError(f"model code folder {str(code_dir)!r} does not exist")
    before = set(sys.modules)
    sys.path.insert(0, str(code_dir))
    try:
        try:
            module = importlib.import_module(spec.module)
        except Exception as exc:  # the user's code can raise anything at import
            raise ModelError(f"factory {spec.factory!r}: importing {spec.module!r} failed "
                             f"({type(exc).__name__}: {exc})") from None
        function = getattr(module, spec.function, None)
        if not callable(function):
            raise ModelError(f"factory {spec.factory!r}: module {spec.module!r} has no "
                             f"function {spec.function!r}")
        try:
            if seed is None:
                model = function(**spec.kwargs)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    model = function(**spec.kwargs)
        except Exception as exc:
            raise ModelError(f"factory {spec.factory!r} with kwargs {spec.kwargs} raised "
                             f"{type(exc).__name__}: {exc}") from None
    finally:
        sys.path.remove(str(code_dir))
        for name in set(sys.modules) - before:
            sys.modules.pop(name, None)
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory {spec.factory!r} returned {type(model).__name__}, not a "
                         "torch.nn.Module")
    model.zoo_spec = spec
    model.code_dir = code_dir
    return model
