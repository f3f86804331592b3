"""Patients by image content, the locked test set, and the cross-validation folds.

`patientid` in cxr/images.csv is not a patient key: the same film appears under different ids (97 and
178, 78 and 201, ...), and COVID-QU-Ex holds copies of Cohen films that `cohen_filename` marks only
partly. Twins are found by content. Every image becomes 128 px thumbnails (squashed to a square, 1-99
percentile stretch; with and without its uniform margins). Candidate pairs: each image's nearest
neighbours by normalised cross-correlation (NCC) of 32 px thumbnails, whole or centrally cropped (one
film cut tighter than another). Each candidate is aligned by an affine ECC fit (scale, shift, crop,
aspect) and scored by the NCC of its fine detail (a difference of Gaussians) over the central 60 % of
the overlap. One film, re-encoded, resized or cropped, scores 0.99-1.00; the same patient's films of
other days 0.5-0.95; two patients' radiographs, however alike in shape, below 0.7 (every Cohen pair
with different ids that is no twin). THRESHOLD 0.90 sits in the gap: docs/images/duplicates-contact-sheet.png
shows the pairs nearest it.

Merged patient: union-find over Cohen patient ids (the filename where an id is empty), QU-Ex images,
`cohen_filename` links and the committed twin pairs (`model/evidence/duplicates.csv`, written by
`python -m model.patients`, about 3 minutes on one core). Images are named `cxr/<filename>` or
`qu-ex/<filename>`.
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).parent
PAIRS_FILE = HERE / "evidence" / "duplicates.csv"
LOCKED_FILE = HERE / "locked_test.csv"
THRESHOLD = 0.90     # aligned detail NCC from which two images are one film (or one patient's)
THUMB = 128          # thumbnail side, px
COARSE = 32          # side of the thumbnails compared for candidates
CROPS = (1.0, 0.9, 0.8)  # central crops compared for candidates (one film cut tighter than another)
NEIGHBOURS = 5       # candidates per image and pairing of crops
SCORED = 0.6         # central part of the overlap whose detail is compared
GATE = 0.5           # half-size detail NCC below which a pair is not aligned at full size
LOCK_SEED = 20261130
LOCK_FRACTION = 0.15


def image_id(source: str, filename: str) -> str:
    return f"{source}/{filename}"


# ---------------------------------------------------------------- twins by content

def thumbnails(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Any image -> two THUMB x THUMB uint8 views, squashed to a square with a 1-99 percentile stretch:
    of the image without its uniform margins (padding, frames; the one aligned and scored) and of the
    whole image (a small copy's margins may not be uniform any more, so both find candidates).
    Large JPEGs are decoded at 1/4 scale."""
    gray = cv2.imread(str(path), cv2.IMREAD_REDUCED_GRAYSCALE_4)
    if gray is None or max(gray.shape) < 2 * THUMB:
        gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if gray is None:
        raise ValueError(f"cannot read image {path}")
    return _stretched(_trim(gray)), _stretched(gray)


def thumbnail(path: Path) -> np.ndarray:
    return thumbnails(path)[0]


def _stretched(gray: np.ndarray) -> np.ndarray:
    small = cv2.resize(gray, (THUMB, THUMB), interpolation=cv2.INTER_AREA).astype(np.float32)
    low, high = np.percentile(small, (1, 99))
    return np.round(np.clip((small - low) / max(high - low, 1.0), 0, 1) * 255).astype(np.uint8)


def _trim(gray: np.ndarray) -> np.ndarray:
    """Without uniform margins (padding, frames): rows and columns at the edges whose pixels barely
    vary; at most a quarter of each side."""
    def kept(spread):
        busy = np.nonzero(spread >= 4)[0]
        if busy.size == 0:
            return 0, spread.size
        quarter = spread.size // 4
        return min(busy[0], quarter), max(busy[-1] + 1, spread.size - quarter)
    (top, bottom), (left, right) = kept(gray.std(1)), kept(gray.std(0))
    return gray[top:bottom, left:right]


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    rows = rows - rows.mean(1, keepdims=True)
    return rows / (np.linalg.norm(rows, axis=1, keepdims=True) + 1e-9)


def _central(thumb: np.ndarray, crop: float) -> np.ndarray:
    margin = round(THUMB * (1 - crop) / 2)
    return thumb[margin:THUMB - margin, margin:THUMB - margin]


def candidate_pairs(views: list[np.ndarray], neighbours: int = NEIGHBOURS) -> dict[tuple[int, int], set[float]]:
    """(i, j) with i < j -> the zooms of j relative to i to start the alignment from: for each view
    (stacked thumbnails) and pairing of crops (whole vs whole, whole vs each central crop and back),
    each image's `neighbours` nearest images by NCC of 32 px thumbnails."""
    pairs: dict[tuple[int, int], set[float]] = {}
    for thumbs in views:
        features = [_unit_rows(np.stack([cv2.resize(_central(t, c), (COARSE, COARSE), interpolation=cv2.INTER_AREA)
                                         .ravel().astype(np.float32) for t in thumbs])) for c in CROPS]
        count = min(neighbours, len(thumbs) - 1)
        for a, b in [(0, 0)] + [(0, k) for k in range(1, len(CROPS))] + [(k, 0) for k in range(1, len(CROPS))]:
            ncc = features[a] @ features[b].T
            np.fill_diagonal(ncc, -2.0)
            for i, row in enumerate(ncc):
                for j in np.argsort(-row, kind="stable")[:count]:
                    zoom = CROPS[b] / CROPS[a] if i < j else CROPS[a] / CROPS[b]
                    pairs.setdefault((min(i, j), max(i, j)), set()).add(round(zoom, 3))
    return pairs


def _band(image: np.ndarray, scale: float = 1.0) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), scale) - cv2.GaussianBlur(image, (0, 0), 4 * scale)


def _detail_ncc(a: np.ndarray, b: np.ndarray, warp: np.ndarray) -> float:
    """NCC of the fine detail of a and of b warped onto it, over the central part of their overlap
    (the edges of films, frames and padding line up between any two images cut the same way and
    would count as shared detail); 0 when they overlap too little."""
    size = a.shape[0]
    flags = cv2.INTER_LINEAR + cv2.WARP_INVERSE_MAP
    moved = cv2.warpAffine(b, warp, (size, size), flags=flags)
    overlap = cv2.warpAffine(np.ones_like(b), warp, (size, size), flags=flags) > 0.999
    rows, columns = np.nonzero(overlap)
    if rows.size < 0.25 * size * size:
        return 0.0
    inside = np.zeros_like(overlap)
    (top, bottom), (left, right) = _middle(rows), _middle(columns)
    inside[top:bottom, left:right] = True
    inside &= overlap
    x, y = _band(a, size / THUMB)[inside], _band(moved, size / THUMB)[inside]
    x, y = x - x.mean(), y - y.mean()
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-9))


def _middle(indices: np.ndarray) -> tuple[int, int]:
    low, high = indices.min(), indices.max() + 1
    margin = round((high - low) * (1 - SCORED) / 2)
    return low + margin, high - margin


def aligned_ncc(a: np.ndarray, b: np.ndarray, zooms=(1.0,)) -> float:
    """NCC of the fine detail of thumbnails a and b after an affine ECC alignment of b onto a: at
    64 px from each of `zooms` and from none; if that half-size figure reaches GATE, again at 128 px
    from the best fit (otherwise the half-size figure is returned: the pair is no twin)."""
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-4)
    a, b = a.astype(np.float32) / 255, b.astype(np.float32) / 255
    half_a, half_b = (cv2.resize(x, (THUMB // 2, THUMB // 2), interpolation=cv2.INTER_AREA) for x in (a, b))
    fits = []
    for s in sorted({1.0, *zooms}):
        start = np.array([[s, 0, THUMB / 4 * (1 - s)], [0, s, THUMB / 4 * (1 - s)]], np.float32)
        try:
            fits.append(cv2.findTransformECC(half_a, half_b, start, cv2.MOTION_AFFINE, criteria, None, 3))
        except cv2.error:  # did not converge
            pass
    if not fits:
        return 0.0
    warp = max(fits, key=lambda fit: fit[0])[1]
    coarse = _detail_ncc(half_a, half_b, warp)
    if coarse < GATE:
        return coarse
    warp[:, 2] *= 2
    try:
        warp = cv2.findTransformECC(a, b, warp, cv2.MOTION_AFFINE, criteria, None, 3)[1]
    except cv2.error:
        pass
    return _detail_ncc(a, b, warp)


def score_candidates(images: dict[str, Path], neighbours: int = NEIGHBOURS,
                     progress=None) -> list[tuple[str, str, float]]:
    """Every candidate pair of `images` (id -> path) with its aligned NCC, sorted by id."""
    ids = sorted(images)
    trimmed, whole = (np.stack(view) for view in zip(*(thumbnails(images[i]) for i in ids)))
    pairs = candidate_pairs([trimmed, whole], neighbours)
    iterate = progress(sorted(pairs)) if progress else sorted(pairs)
    return [(ids[i], ids[j], round(aligned_ncc(trimmed[i], trimmed[j], pairs[i, j]), 4)) for i, j in iterate]


def find_twins(images: dict[str, Path], threshold: float = THRESHOLD, **options) -> list[tuple[str, str, float]]:
    """(id a, id b, aligned NCC) of every pair of `images` judged one film."""
    return [pair for pair in score_candidates(images, **options) if pair[2] >= threshold]


def all_images(cxr_dir: Path, quex_dir: Path) -> dict[str, Path]:
    from model.data import load_quex_records, load_records
    images = {image_id("cxr", r.filename): r.image_path for r in load_records(cxr_dir)}
    images.update({image_id("qu-ex", q.filename): q.image_path for q in load_quex_records(quex_dir)})
    return images


def write_pairs(pairs: list[tuple[str, str, float]], path: Path = PAIRS_FILE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_a", "image_b", "aligned_ncc"])
        writer.writerows(sorted(pairs))


def read_pairs(path: Path = PAIRS_FILE) -> list[tuple[str, str, float]]:
    with open(path) as handle:
        return [(row["image_a"], row["image_b"], float(row["aligned_ncc"])) for row in csv.DictReader(handle)]


# ---------------------------------------------------------------- merged patients

def merged_patients(records, quex_records=(), pairs=None) -> dict[str, str]:
    """Image id -> merged patient key, for every Cohen record and QU-Ex record given and every image
    named in `pairs` (default: the committed twin pairs). A key is its group's smallest member name:
    a Cohen patient id (`image:<filename>` for an image without one) before any `qu-ex/<filename>`."""
    parent: dict[str, str] = {}

    def find(node):
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    def union(a, b):
        a, b = find(a), find(b)
        if a != b:
            first, second = sorted((a, b), key=_key_order)
            parent[second] = first

    node_of = {image_id("cxr", r.filename): r.patient for r in records}  # Record.patient: id or image:<name>
    by_name = {r.filename: r for r in records}
    for q in quex_records:
        node_of[image_id("qu-ex", q.filename)] = image_id("qu-ex", q.filename)
        if q.cohen_filename in by_name:
            union(image_id("qu-ex", q.filename), by_name[q.cohen_filename].patient)
    for a, b, _ in read_pairs() if pairs is None else pairs:
        union(node_of.setdefault(a, a), node_of.setdefault(b, b))
    return {image: find(node) for image, node in node_of.items()}


def _key_order(node: str):
    return (node.startswith("qu-ex/"), node.startswith("cxr/"), node.startswith("image:"),
            int(node) if node.isdigit() else float("inf"), node)


def groups(patients: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for image, key in sorted(patients.items()):
        out.setdefault(key, []).append(image)
    return out


# ---------------------------------------------------------------- locked test set and folds

def choose_locked_test(records, quex_records, patients: dict[str, str], lung_split: dict[str, str],
                       seed: int = LOCK_SEED, fraction: float = LOCK_FRACTION) -> dict[str, str]:
    """Locked test images (id -> merged key): all images of `fraction` (rounded up) of the merged
    patients of each stratum, drawn by a seeded permutation of their sorted keys. Strata (a patient goes
    to the first that fits): Cohen with labelme polygons, with an extent score, with Brixia scores,
    other Cohen; QU-Ex only with a COVID image; QU-Ex only, normals. Cohen patients are drawn only among
    those whose every Cohen image is in the lung split's test part (`lung_split`: filename -> split.csv
    split; the 2.x lung model neither trained nor was selected on them)."""
    cohen = {image_id("cxr", r.filename): r for r in records}
    covid = {image_id("qu-ex", q.filename) for q in quex_records if q.infection_mask_path}

    def stratum(members):
        labelled = [cohen[m] for m in members if m in cohen]
        if not labelled:
            return "qu-ex covid" if any(m in covid for m in members) else "qu-ex normal"
        for name, has in (("polygons", lambda r: r.labelme_path), ("extent", lambda r: r.extent is not None),
                          ("brixia", lambda r: r.brixia_zones)):
            if any(has(r) for r in labelled):
                return name
        return "cohen other"

    members_of = groups(patients)
    strata: dict[str, list[str]] = {}
    for key, members in members_of.items():
        strata.setdefault(stratum(members), []).append(key)
    rng = np.random.default_rng(seed)
    locked = {}
    for name in ("polygons", "extent", "brixia", "cohen other", "qu-ex covid", "qu-ex normal"):
        keys = sorted(strata.get(name, []))
        eligible = [k for k in keys if all(lung_split.get(cohen[m].filename, "test") == "test"
                                           for m in members_of[k] if m in cohen)]
        for k in [eligible[i] for i in rng.permutation(len(eligible))][:math.ceil(fraction * len(keys))]:
            locked.update({m: k for m in members_of[k]})
    return locked


def write_locked(locked: dict[str, str], seed: int = LOCK_SEED, path: Path = LOCKED_FILE) -> None:
    with open(path, "w", newline="") as handle:
        handle.write(f"# Locked test set, chosen 2026-11-30 with seed {seed} by merged patient (model/patients.py,\n"
                     "# choose_locked_test) before any v3 change. Never train, tune or select on these images;\n"
                     "# score them once, with the shipped model. Do not regenerate: extend it only to keep\n"
                     "# whole merged patients in it.\n")
        writer = csv.writer(handle)
        writer.writerow(["filename", "source", "patient"])
        for image in sorted(locked):
            source, filename = image.split("/", 1)
            writer.writerow([filename, "cxr" if source == "cxr" else "qu-ex", locked[image]])


def read_locked(path: Path = LOCKED_FILE) -> dict[str, str]:
    """Image id -> merged patient key, from the committed locked test list."""
    with open(path) as handle:
        rows = csv.DictReader(line for line in handle if not line.startswith("#"))
        return {image_id(row["source"], row["filename"]): row["patient"] for row in rows}


def held_out(patients: dict[str, str], locked=None) -> set[str]:
    """Image ids of every merged patient with a locked image (default: the committed locked test set):
    they never train, tune or enter cross-validation."""
    locked = read_locked() if locked is None else locked
    keys = {patients.get(image, key) for image, key in locked.items()}
    return {image for image, key in patients.items() if key in keys} | set(locked)


def patient_folds(patients: dict[str, str], folds: int, seed: int, locked=None) -> dict[str, int]:
    """Merged patient -> fold, by a seeded permutation of the sorted keys of the patients of
    `patients` (image id -> key) that are not held out for the locked test."""
    barred = held_out(patients, locked)
    keys = sorted({key for image, key in patients.items() if image not in barred})
    order = np.random.default_rng(seed).permutation(len(keys))
    return {keys[i]: k % folds for k, i in enumerate(order)}


# ---------------------------------------------------------------- evidence

def contact_sheet(images: dict[str, Path], scored: list[tuple[str, str, float]], out_path: Path,
                  threshold: float = THRESHOLD, count: int = 40, tile: int = 96) -> Path:
    """The `count` scored pairs nearest the threshold, side by side, score in red (kept) or blue."""
    near = sorted(scored, key=lambda p: abs(p[2] - threshold))[:count]
    tiles = []
    for a, b, score in sorted(near, key=lambda p: -p[2]):
        pair = np.hstack([cv2.resize(thumbnail(images[x]), (tile, tile)) for x in (a, b)])
        pair = cv2.cvtColor(pair, cv2.COLOR_GRAY2BGR)
        colour = (0, 0, 255) if score >= threshold else (255, 128, 0)
        cv2.rectangle(pair, (0, 0), (2 * tile, 14), (0, 0, 0), -1)
        cv2.putText(pair, f"{score:.3f} {a.split('/')[-1][:12]}|{b.split('/')[-1][:12]}", (2, 11),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.3, colour, 1, cv2.LINE_AA)
        tiles.append(cv2.copyMakeBorder(pair, 2, 2, 2, 2, cv2.BORDER_CONSTANT, value=(40, 40, 40)))
    while len(tiles) % 4:
        tiles.append(np.zeros_like(tiles[0]))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out_path), np.vstack([np.hstack(tiles[i:i + 4]) for i in range(0, len(tiles), 4)]),
                [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return out_path


def main(argv=None) -> None:
    """Find the twins of both collections and write the evidence; `--lock` also writes the locked
    test list (done once, on 2026-11-30)."""
    from tqdm import tqdm

    from model.data import load_quex_records, load_records, read_split
    parser = argparse.ArgumentParser(prog="python -m model.patients")
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--sheet", type=Path, default=HERE.parent / "docs" / "images" / "duplicates-contact-sheet.png")
    parser.add_argument("--lock", action="store_true")
    args = parser.parse_args(argv)
    images = all_images(args.data / "cxr", args.data / "covid-qu-ex")
    scored = score_candidates(images, progress=lambda pairs: tqdm(pairs, desc="aligning candidates"))
    twins = [p for p in scored if p[2] >= THRESHOLD]
    write_pairs(twins)
    contact_sheet(images, scored, args.sheet)
    print(f"{len(scored)} candidate pairs, {len(twins)} at or above {THRESHOLD} -> {PAIRS_FILE}")
    if args.lock:
        records, quex_records = load_records(args.data / "cxr"), load_quex_records(args.data / "covid-qu-ex")
        write_locked(choose_locked_test(records, quex_records, merged_patients(records, quex_records, twins),
                                        read_split()))


if __name__ == "__main__":
    main()
