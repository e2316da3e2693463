"""How an image-folder tree (a folder, or the members of an archive) is laid out: its root, its splits and
class folders, and which names count; pure functions of names, no reading."""

from __future__ import annotations

from pathlib import Path

from .errors import UsageError, arg

TEST_SPLIT_NAMES = ("test", "val")


def find_layout(origin: Path, dirs: set[str], names: list[str]) -> tuple[str, str | None, list[str]]:
    """The tree's root folder (holding train/), its test split's name (None when absent) and classes."""
    all_dirs = set(dirs) | {p for name in names for p in _parents(name)}
    root = _find_root(origin, all_dirs)
    test_name = next((s for s in TEST_SPLIT_NAMES if join_path(root, s) in all_dirs), None)
    train_classes = _class_dirs(all_dirs, join_path(root, "train"))
    if test_name is not None:
        test_classes = _class_dirs(all_dirs, join_path(root, test_name))
        if train_classes != test_classes:
            only_train = sorted(set(train_classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(train_classes))
            raise UsageError(
                f"{arg('data')} {origin}: the classes of train/ and {test_name}/ differ "
                f"(only in train: {only_train or 'none'}; only in {test_name}: {only_test or 'none'})"
            )
    if not train_classes:
        raise UsageError(f"{arg('data')} {origin}: {join_path(root, 'train')}/ has no class folders")
    return root, test_name, train_classes


def class_files(names: list[str], root: str, split: str, classes: list[str]) -> list[tuple[str, int]]:
    """(name, label) of the files directly in each class folder of ``split``, classes and names sorted."""
    out = []
    for label, cls in enumerate(classes):
        prefix = join_path(root, split, cls) + "/"
        out += [
            (n, label)
            for n in sorted(n for n in names if n.startswith(prefix) and "/" not in n[len(prefix) :])
        ]
    return out


def _find_root(origin: Path, dirs: set[str]) -> str:
    """The folder holding train/: the top of the tree, or one level down (archives often add one)."""
    candidates = sorted(
        d[: -len("train")].rstrip("/")
        for d in dirs
        if d == "train" or (d.endswith("/train") and d.count("/") == 1)
    )
    if not candidates:
        raise UsageError(
            f"{arg('data')} {origin}: no train/ folder found; expected train/<class>/* and test/<class>/* "
            "(or val/<class>/*)"
        )
    return candidates[0]


def _class_dirs(dirs: set[str], split_dir: str) -> list[str]:
    """The class folders directly under ``split_dir``, sorted."""
    prefix = split_dir + "/"
    return sorted(d[len(prefix) :] for d in dirs if d.startswith(prefix) and "/" not in d[len(prefix) :])


def split_of(name: str, root: str) -> str | None:
    """The split folder (train, test or val) ``name`` is a class image of, else None."""
    rel = name[len(root) + 1 :] if root else name
    parts = rel.split("/")
    return parts[0] if len(parts) == 3 and parts[0] in ("train", *TEST_SPLIT_NAMES) else None


def _parents(name: str) -> list[str]:
    """Every folder above ``name``, outermost first."""
    parts = name.strip("/").split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def join_path(*parts: str) -> str:
    """The non-empty ``parts`` joined by "/" (an empty root adds nothing)."""
    return "/".join(p for p in parts if p)


def hidden(name: str) -> bool:
    """Whether ``name`` is in a hidden folder or is one (dotfiles, ``__MACOSX``)."""
    return any(part.startswith(".") or part == "__MACOSX" for part in name.strip("/").split("/"))


def member_name(name: str) -> str:
    """An archive member's path without a leading './' (as written by ``tar -czf x.tar.gz -C dir .``)."""
    name = name.strip("/")
    while name == "." or name.startswith("./"):
        name = name[2:].lstrip("/")
    return name
