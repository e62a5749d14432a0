"""The model code a converted MLX folder carries, so stock mlx-lm runs it without regla.

mlx-lm imports ``config["model_file"]`` by path, as a lone module named ``custom_model``
(``importlib.util.spec_from_file_location``), and takes ``Model`` and ``ModelArgs`` from it.
A lone module cannot import its neighbours relatively, and pointing it at the installed
``regla`` would tie the folder to one install. So the folder gets

    DST/regla_model.py      the entry mlx-lm imports: loads the package below under a name of
                            its own (it never shadows an installed regla) and re-exports
                            Model and ModelArgs
    DST/regla_code/         the modules ``regla_mlx.model`` needs, found by following its
                            imports of ``regla*`` modules (``ast``, so it stays right as the
                            model grows new modules), copied flat with those imports made
                            relative; ``metal/`` holds the Metal kernel sources

Only ``import``/``from ... import`` statements are followed; a module loaded by a computed
name (``importlib.import_module(f"...")``) would be missed, and the bundler does not allow
the forms it cannot rewrite (``import regla.spec`` used as ``regla.spec.X``): it raises.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import shutil
from pathlib import Path

from .common import ConvertError

ENTRY = "regla_mlx.model"  # the module that defines Model and ModelArgs for mlx-lm
ROOTS = ("regla", "regla_mlx", "regla_torch")  # our top-level packages: imports of these are bundled
MODEL_FILE = "regla_model.py"
PACKAGE = "regla_code"
METAL_SUFFIXES = (".metal", ".h")


class BundleError(ConvertError):
    """The model's code cannot be bundled into the folder (a form of import the bundler does not rewrite)."""


def _ours(name: str, roots=ROOTS) -> bool:
    return name.split(".")[0] in roots


def _spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _is_module(name: str) -> bool:
    return _spec(name) is not None


def _file(name: str) -> Path:
    spec = _spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise BundleError(f"cannot find the source of {name} to copy it into the converted folder")
    if spec.submodule_search_locations is not None:
        raise BundleError(f"the model code imports the package {name} itself (its __init__); import its "
                          "modules instead, so they can be bundled flat")
    return Path(spec.origin)


def _absolute(node: ast.ImportFrom, module: str) -> str:
    """The absolute module name a ``from X import ...`` refers to, inside module ``module``."""
    if not node.level:
        return node.module
    parts = module.split(".")[:-node.level]  # modules of ours are never packages (see _file)
    if not parts:
        raise BundleError(f"{module}: relative import beyond the top-level package")
    return ".".join(parts + ([node.module] if node.module else []))


def _targets(node, module: str, roots=ROOTS) -> list[tuple[str, object]]:
    """(module name of ours, alias) for each of ours that ``node`` imports; the alias is the
    ``ast.alias`` imported *from* that module, or None when the module itself is bound."""
    out = []
    if isinstance(node, ast.Import):
        for a in node.names:
            if _ours(a.name, roots):
                out.append((a.name, None if a.asname else "bare"))
    elif isinstance(node, ast.ImportFrom):
        base = _absolute(node, module)
        if _ours(base, roots):
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, None) if a.name != "*" and _is_module(sub) else (base, a))
    return out


def collect(entry: str = ENTRY, roots=ROOTS) -> dict[str, Path]:
    """Every module of ours that ``entry`` imports, directly or not: {dotted name: source file}."""
    found, todo = {}, [entry]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found[name] = _file(name)
        tree = ast.parse(found[name].read_text(), str(found[name]))
        for node in ast.walk(tree):
            for target, alias in _targets(node, name, roots):
                if alias == "bare":
                    raise BundleError(f"{found[name]}:{node.lineno}: `import {target}` binds the package "
                                      f"name; write `from {target.rpartition('.')[0]} import "
                                      f"{target.rpartition('.')[2]}` so the module can be bundled")
                todo.append(target)
    flat = {}
    for name, path in found.items():
        short = name.rpartition(".")[2]
        if short in flat:
            raise BundleError(f"{flat[short]} and {name} would both be {PACKAGE}/{short}.py in the converted "
                              "folder: rename one of them")
        flat[short] = name
    return found


def _rewrite(node, module: str) -> str:
    """The statement replacing an import of our modules: the same names, imported relatively."""
    names = lambda a: a.name + (f" as {a.asname}" if a.asname else "")  # noqa: E731
    if isinstance(node, ast.Import):
        return "; ".join(f"from . import {n.name.rpartition('.')[2]} as {n.asname}" for n in node.names)
    base = _absolute(node, module)
    mods = [a for a in node.names if a.name != "*" and _is_module(f"{base}.{a.name}")]
    attrs = [a for a in node.names if a not in mods]
    parts = []
    if mods:
        parts.append("from . import " + ", ".join(names(a) for a in mods))
    if attrs:
        parts.append(f"from .{base.rpartition('.')[2]} import " + ", ".join(names(a) for a in attrs))
    return "; ".join(parts)


def relative_source(path: Path, module: str, roots=ROOTS) -> str:
    """``path``'s text with each import of our modules rewritten to a flat relative one."""
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    edits = []
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and _targets(node, module, roots):
            if isinstance(node, ast.Import) and not all(_ours(a.name, roots) for a in node.names):
                raise BundleError(f"{path}:{node.lineno}: split this import so ours stand alone")
            edits.append(node)
    # Columns are UTF-8 byte offsets: edit bytes, last edit first so earlier offsets hold.
    blines = [ln.encode() for ln in lines]
    for node in sorted(edits, key=lambda n: (n.lineno, n.col_offset), reverse=True):
        first, last = node.lineno - 1, node.end_lineno - 1
        new = blines[first][:node.col_offset] + _rewrite(node, module).encode() + blines[last][node.end_col_offset:]
        blines[first:last + 1] = [new]
    return b"".join(blines).decode()


def metal_sources(modules: dict[str, Path]) -> list[Path]:
    """The Metal kernel sources the bundled code reads: a ``metal/`` folder beside one of the
    modules, else the ``regla.metal`` package data."""
    dirs = [p.parent / "metal" for p in modules.values()]
    spec = _spec("regla.metal")
    if spec is not None and spec.submodule_search_locations:
        dirs += [Path(d) for d in spec.submodule_search_locations]
    for d in dirs:
        files = sorted(p for p in d.glob("*") if p.suffix in METAL_SUFFIXES) if d.is_dir() else []
        if files:
            return files
    return []


ENTRY_TEMPLATE = '''"""mlx-lm ``model_file`` of this folder, written by ``regla convert`` (regla {version}).

Stock ``mlx_lm.generate --model THIS_FOLDER --trust-remote-code`` imports this file. It loads
the model code bundled in ``{package}/`` as the package ``{name}`` (a name of its own, so an
installed regla is neither needed nor shadowed) and hands mlx-lm its Model and ModelArgs.
"""

import importlib
import importlib.util
import logging
import sys
from pathlib import Path

_NAME = "{name}"
_DIR = Path(__file__).resolve().parent / "{package}"


class _QuietModelType(logging.Filter):
    """mlx-lm loads the tokenizer with AutoTokenizer, which reads config.json with transformers'
    generic config class and warns that model_type "regla" is not that class: true, and
    irrelevant to a tokenizer. Only that one message is dropped."""

    regla_model_type = True  # one such filter per process, whichever folder's file added it

    def filter(self, record):
        return not record.getMessage().startswith("You are using a model of type `regla` to instantiate "
                                                  "a model of type ``")


def _package():
    if _NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(_NAME, _DIR / "__init__.py",
                                                      submodule_search_locations=[str(_DIR)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[_NAME] = package
        try:
            spec.loader.exec_module(package)
        except BaseException:
            del sys.modules[_NAME]
            raise
    return importlib.import_module(_NAME + ".{entry}")


_config_log = logging.getLogger("transformers.configuration_utils")
if not any(getattr(f, "regla_model_type", False) for f in _config_log.filters):
    _config_log.addFilter(_QuietModelType())

_model = _package()
Model = _model.Model
ModelArgs = _model.ModelArgs
'''

PACKAGE_INIT = '"""regla model code bundled by `regla convert`: the modules the model imports, flat."""\n'


def write_bundle(dst: Path, entry: str = ENTRY, roots=ROOTS) -> str:
    """Write ``dst/regla_model.py`` and ``dst/regla_code/``; returns the model_file name for config.json.
    ``roots``: the top-level packages whose modules are bundled (imports of others are left alone)."""
    from regla import __version__

    modules = collect(entry, roots)
    pkg = Path(dst) / PACKAGE
    pkg.mkdir()
    digest = hashlib.sha256()
    (pkg / "__init__.py").write_text(PACKAGE_INIT)
    for name, path in sorted(modules.items()):
        text = relative_source(path, name, roots)
        (pkg / f"{name.rpartition('.')[2]}.py").write_text(text)
        digest.update(name.encode() + b"\0" + text.encode())
    metal = metal_sources(modules)
    if metal:
        (pkg / "metal").mkdir()
        for f in metal:
            shutil.copy2(f, pkg / "metal" / f.name)
            digest.update(f.name.encode() + b"\0" + f.read_bytes())
    unique = f"_regla_model_{digest.hexdigest()[:16]}"
    (Path(dst) / MODEL_FILE).write_text(ENTRY_TEMPLATE.format(
        version=__version__, package=PACKAGE, name=unique, entry=entry.rpartition(".")[2]))
    return MODEL_FILE
