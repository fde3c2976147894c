"""Put FIRE into a BackdoorBench checkout, or take it out: ``fire-bench backdoorbench install|uninstall --root PATH``.

``install`` writes ``defense/fire.py`` (a small entry script that runs :mod:`fire_bench.backdoorbench.defense`)
and ``config/defense/fire/{config,cifar10,cifar100,gtsrb,tiny}.yaml`` (our defaults). The first line of each
file marks it as ours and holds the SHA-256 of the rest, so both commands know their own unchanged files:
``install`` replaces those, and refuses, writing nothing, when a path it would write holds a file it did not
write or one changed since, or leads out of the checkout (a symlinked folder); it is all or nothing: every file
is first written beside its destination, and only when all are written are they renamed into place (a folder it
cannot write leaves nothing behind). ``uninstall`` removes only its own unchanged files and names those it left.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import sys
from importlib import resources
from pathlib import Path

from fire_bench.atomic import partial_path
from fire_defense import FireDefenseError, __version__

__all__ = ["CONFIG_NAMES", "add_commands", "install", "packaged_config", "uninstall"]

CONFIG_NAMES = ("config", "cifar10", "cifar100", "gtsrb", "tiny")
ENTRY_SCRIPT = "defense/fire.py"
CONFIG_DIR = "config/defense/fire"
_HEADER = "# Written by fire-defense {version} (`fire-bench backdoorbench install`); sha256:{digest}\n"
_HEADER_PATTERN = re.compile(
    r"# Written by fire-defense \S+ \(`fire-bench backdoorbench install`\); sha256:(?P<digest>[0-9a-f]{64})"
)

_ENTRY = '''"""FIRE (fire-defense) as a BackdoorBench defense. Run it from BackdoorBench's root with a Python
that has fire-defense installed:

    python ./defense/fire.py --result_file NAME --yaml_path ./config/defense/fire/cifar10.yaml --dataset cifar10

It writes record/NAME/defense/fire/. Options: python ./defense/fire.py --help
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# BackdoorBench's root goes on the path for its defense.base (last, so that its folders shadow no installed
# package), and this folder comes off it (so that the scripts here shadow nothing either).
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE] + [str(HERE.parent)]

try:
    from fire_bench.backdoorbench.defense import main
except ModuleNotFoundError as error:
    if not (error.name or "").startswith("fire_"):
        raise
    print(
        f"defense/fire.py: error: fire-defense is not installed for {sys.executable}; install it there "
        "or run this script with the Python that has it.",
        file=sys.stderr,
    )
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main(root=HERE.parent))
'''


def packaged_config(name: str = "config") -> str:
    """The text of our default YAML config ``name`` (one of :data:`CONFIG_NAMES`)."""
    return (resources.files("fire_bench.backdoorbench") / "config" / f"{name}.yaml").read_text()


def _targets() -> list[str]:
    """The files install writes, relative to the checkout."""
    return [ENTRY_SCRIPT, *(f"{CONFIG_DIR}/{name}.yaml" for name in CONFIG_NAMES)]


def _digest(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


def _owner(path: Path) -> str:
    """``absent``, ``ours`` (written by install, unchanged), ``changed`` (by install, edited since) or ``foreign``."""
    if not path.exists() and not path.is_symlink():
        return "absent"
    if path.is_symlink() or not path.is_file():
        return "foreign"
    try:
        first, _, body = path.read_text(encoding="utf-8").partition("\n")
    except (OSError, UnicodeDecodeError):
        return "foreign"
    match = _HEADER_PATTERN.fullmatch(first)
    if match is None:
        return "foreign"
    return "ours" if match["digest"] == _digest(body) else "changed"


def _checkout(root: str | Path) -> Path:
    root = Path(root)
    if not (root / "defense" / "base.py").is_file():
        raise FireDefenseError(
            f"{root} is not a BackdoorBench checkout (it has no defense/base.py); pass its root folder with --root."
        )
    return root


def _outside(root: Path, rel: str) -> bool:
    """Whether ``root / rel`` leads out of ``root`` (through a symlinked folder or file on the way)."""
    return not (root / rel).resolve().is_relative_to(root.resolve())


def _stage(root: Path, bodies: dict[str, str]) -> tuple[dict[Path, Path], list[Path]]:
    """Each body written to a temporary name beside its destination: ``{temporary: destination}``, and the
    folders made for them (outermost first). On any error, everything made is removed again."""
    staged: dict[Path, Path] = {}
    made: list[Path] = []
    try:
        for rel, body in bodies.items():
            path = root / rel
            missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
            for folder in reversed(missing):
                folder.mkdir()
                made.append(folder)
            partial = partial_path(path)
            staged[partial] = path
            partial.write_text(_HEADER.format(version=__version__, digest=_digest(body)) + body, encoding="utf-8")
    except OSError as error:
        _unstage(staged, made)
        where = error.filename or root
        raise FireDefenseError(
            f"cannot write into {root} ({error.strerror or error}: {where}); nothing was installed. "
            "Make the checkout writable and run install again."
        ) from None
    return staged, made


def _unstage(staged: dict[Path, Path], made: list[Path]) -> None:
    for partial in staged:
        with contextlib.suppress(OSError):
            partial.unlink()
    for folder in reversed(made):
        with contextlib.suppress(OSError):
            folder.rmdir()


def install(root: str | Path) -> list[Path]:
    """Write FIRE's entry script and YAML configs into the BackdoorBench checkout at ``root``, all or nothing.

    Returns:
        The files written (an earlier install's unchanged files are replaced).

    Raises:
        FireDefenseError: ``root`` is not a BackdoorBench checkout, a path to write holds a file that
            install did not write or that was changed since, a path leads out of the checkout through a
            symlink, or a file cannot be written; nothing is written then.
    """
    root = _checkout(root)
    escaping = [rel for rel in _targets() if _outside(root, rel)]
    if escaping:
        raise FireDefenseError(
            f"refusing to write {', '.join(escaping)}: in {root} the path leads out of the checkout through a "
            "symlink; replace the link with a folder and run install again."
        )
    blocked = [(rel, owner) for rel in _targets() if (owner := _owner(root / rel)) in ("changed", "foreign")]
    if blocked:
        why = {"changed": "changed since fire-defense wrote it", "foreign": "not written by fire-defense"}
        listed = ", ".join(f"{rel} ({why[owner]})" for rel, owner in blocked)
        raise FireDefenseError(f"refusing to overwrite {listed} in {root}; move it away and run install again.")
    bodies = {ENTRY_SCRIPT: _ENTRY} | {f"{CONFIG_DIR}/{name}.yaml": packaged_config(name) for name in CONFIG_NAMES}
    staged, made = _stage(root, bodies)
    placed: list[Path] = []
    try:
        for partial, path in staged.items():
            existed = path.exists()
            os.replace(partial, path)
            if not existed:
                placed.append(path)
    except OSError as error:  # rare (the files are written, only renames remain): undo the new ones
        for path in placed:
            with contextlib.suppress(OSError):
                path.unlink()
        _unstage(staged, made)
        raise FireDefenseError(
            f"cannot install into {root} ({error.strerror or error}); nothing new was left. Run install again."
        ) from None
    return list(staged.values())


def uninstall(root: str | Path) -> tuple[list[Path], list[Path]]:
    """Remove what :func:`install` wrote into ``root``, but only files nobody changed since.

    Returns:
        The files removed, and those left at install's paths (changed since, not written by it, or reached
        through a symlink out of the checkout).
    """
    root = _checkout(root)
    removed, left = [], []
    for rel in _targets():
        path, owner = root / rel, _owner(root / rel)
        if owner != "absent" and _outside(root, rel):  # never delete through a link out of the checkout
            left.append(path)
        elif owner == "ours":
            path.unlink()
            removed.append(path)
        elif owner != "absent":
            left.append(path)
    with contextlib.suppress(OSError):  # the folder goes only if nothing else is in it
        (root / CONFIG_DIR).rmdir()
    return removed, left


def _install_command(args: argparse.Namespace) -> None:
    for path in install(args.root):
        print(f"wrote {path}")
    print(
        f"run it from {Path(args.root).resolve()} with this Python (it has fire-defense):\n"
        f"  {sys.executable} ./defense/fire.py --result_file NAME "
        "--yaml_path ./config/defense/fire/cifar10.yaml --dataset cifar10"
    )


def _uninstall_command(args: argparse.Namespace) -> None:
    removed, left = uninstall(args.root)
    for path in removed:
        print(f"removed {path}")
    for path in left:
        print(f"left {path} (changed since install, or not written by fire-defense)")
    if not removed and not left:
        print(f"nothing of fire-defense's in {args.root}")


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``backdoorbench install|uninstall --root PATH`` to a command line's subcommands (``fire-bench``'s)."""
    parser = commands.add_parser("backdoorbench", help="install FIRE as a defense into a BackdoorBench checkout")
    actions = parser.add_subparsers(dest="action", required=True)
    for name, run, text in (
        ("install", _install_command, "write defense/fire.py and config/defense/fire/*.yaml"),
        ("uninstall", _uninstall_command, "remove the files install wrote (unchanged ones only)"),
    ):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("--root", required=True, help="the BackdoorBench checkout (the folder with defense/)")
        action.set_defaults(run=run)
