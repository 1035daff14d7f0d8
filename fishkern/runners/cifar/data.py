"""The images of `fishkern cifar`: CIFAR-10 (hub, saved DatasetDict or .npz) and scikit-learn's digits,
validated into the runner's data dict."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import HUB_NAME, CifarConfig

if TYPE_CHECKING:
    import numpy as np

# numpy and torch are imported where they are used (the command line needs neither)


def _to_nchw(x: np.ndarray, what: str) -> np.ndarray:
    import numpy as np

    if x.ndim == 3:  # (N, H, W): grey
        return x[:, None]
    if x.ndim != 4:
        raise ValueError(f"{what}: images must be (N, H, W, C), (N, C, H, W) or (N, H, W), got shape {x.shape}")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


def make_image_data(x_train, y_train, x_test, y_test, *, name: str, source: str) -> dict[str, Any]:
    """Validate arrays into the runner's data dict: uint8 (0–255) or float images, int labels 0..C-1."""
    import numpy as np
    import torch

    out: dict[str, Any] = {"name": name, "source": source}
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype == object or y.dtype == object:
            raise ValueError(f"{split}: images and labels must be numeric arrays")
        x = _to_nchw(x, split)
        if y.ndim != 1 or y.shape[0] != x.shape[0] or x.shape[0] == 0:
            raise ValueError(f"{split}: {x.shape[0]} images but labels of shape {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{split}: labels must be integers, got {y.dtype}")
        if np.issubdtype(x.dtype, np.integer) and x.dtype != np.uint8 and x.size and 0 <= x.min() and x.max() <= 255:
            x = x.astype(np.uint8)  # e.g. images read back from lists
        if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{split}: images must be uint8 (0-255) or float, got {x.dtype}")
        if min(x.shape[2:]) < 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"{split}: images of shape {x.shape[1:]} (C, H, W) are not 1- or 3-channel images >= 4x4")
        out[f"x_{split}"] = torch.from_numpy(np.ascontiguousarray(x))
        out[f"y_{split}"] = torch.from_numpy(y.astype(np.int64))
    if out["x_train"].shape[1:] != out["x_test"].shape[1:] or out["x_train"].dtype != out["x_test"].dtype:
        raise ValueError(f"train images {tuple(out['x_train'].shape[1:])} {out['x_train'].dtype} and test images "
                         f"{tuple(out['x_test'].shape[1:])} {out['x_test'].dtype} differ")
    lo = min(int(out["y_train"].min()), int(out["y_test"].min()))
    classes = int(max(out["y_train"].max(), out["y_test"].max())) + 1
    if lo < 0 or classes < 2:
        raise ValueError(f"labels must be 0..C-1 with C >= 2, got the range [{lo}, {classes - 1}]")
    out["num_classes"] = classes
    out["scale"] = 255.0 if out["x_train"].dtype == torch.uint8 else 1.0
    return out


def _from_datasetdict(dd, source: str) -> dict[str, Any]:
    import numpy as np

    missing = [s for s in ("train", "test") if s not in dd]
    if missing:
        raise ValueError(f"{source}: the DatasetDict has no {missing} split (it has {list(dd)})")
    arrays = {}
    for split in ("train", "test"):
        ds = dd[split]
        img = next((c for c in ("img", "image") if c in ds.column_names), None)
        lab = next((c for c in ("label", "labels") if c in ds.column_names), None)
        if img is None or lab is None:
            raise ValueError(f"{source}: split {split!r} needs an image column (img/image) and a label column, "
                             f"has {ds.column_names}")
        arrays[split] = (np.stack([np.asarray(im) for im in ds[img]]), np.asarray(ds[lab]))
    return make_image_data(*arrays["train"], *arrays["test"], name="cifar10", source=source)


def load_digits_data() -> dict[str, Any]:
    """scikit-learn's 8×8 handwritten digits (1,797 grey images, values 0–16): a stratified 80/20
    split (1,437 train / 360 test, fixed seed)."""
    import numpy as np

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.2, stratify=d.target, random_state=0)
    return make_image_data(xtr, ytr, xte, yte, name="digits", source="sklearn.datasets.load_digits")


def load_cifar10(data_dir: str | None) -> dict[str, Any]:
    """CIFAR-10: from the hub (``datasets.load_dataset("uoft-cs/cifar10")``) when data_dir is None,
    else from a saved DatasetDict directory or an .npz file (x_train, y_train, x_test, y_test) — the
    path, or the one .npz inside the directory."""
    import numpy as np

    if data_dir is None:
        import datasets

        try:
            dd = datasets.load_dataset(HUB_NAME)
        except OSError as e:  # no network, or the dataset is not reachable
            raise FileNotFoundError(f"could not load {HUB_NAME} from the hub ({e}); offline, pass --data-dir") from e
        return _from_datasetdict(dd, HUB_NAME)
    path = Path(data_dir)
    if not path.exists():
        raise FileNotFoundError(f"data directory {path} does not exist")
    if path.is_dir() and (path / "dataset_dict.json").exists():
        import datasets

        return _from_datasetdict(datasets.load_from_disk(str(path)), str(path))
    npz = [path] if path.is_file() else sorted(path.glob("*.npz"))
    if len(npz) != 1 or npz[0].suffix != ".npz":
        raise ValueError(f"{path} is neither a saved DatasetDict (dataset_dict.json) nor an .npz file / a directory "
                         f"holding exactly one .npz with x_train, y_train, x_test, y_test")
    try:
        with np.load(npz[0], allow_pickle=False) as z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
            if missing:
                raise ValueError(f"{npz[0]} lacks {missing} (has {z.files})")
            arrays = [z[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{npz[0]} is not a readable .npz file ({e})") from e
    return make_image_data(*arrays, name="cifar10", source=str(npz[0]))


def load_data(cfg: CifarConfig) -> dict[str, Any]:
    data = load_digits_data() if cfg.dataset == "digits" else load_cifar10(cfg.data_dir)
    if cfg.max_train_samples:
        data["x_train"], data["y_train"] = data["x_train"][: cfg.max_train_samples], data["y_train"][: cfg.max_train_samples]
    if cfg.max_test_samples:
        data["x_test"], data["y_test"] = data["x_test"][: cfg.max_test_samples], data["y_test"][: cfg.max_test_samples]
    x = data["x_train"].float() / data["scale"]
    data["mean"] = x.mean(dim=(0, 2, 3))
    data["std"] = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return data
