"""The bundled English corpus: Jane Austen's six novels, and its deterministic splits.

The text comes from Debian's ``r-cran-janeaustenr`` package (public-domain novels from Project
Gutenberg, packaged under the MIT licence). It is read straight from the package's R lazy-load
database, so neither R nor an R reader is needed: the data are six character vectors (one string per
printed line) in R's XDR serialization, which takes a few lines to decode.

Splitting is by chapter, so every split is made of whole, coherent passages. Chapters are ranked by
the SHA-256 of their text; the first ones in that order go to ``test`` until it holds
``SPLIT_CHARS`` characters, the next ones to ``calibration``, the rest to ``train``. The ranking
depends only on the text, so every rebuild gives the same splits.

Shipped in ``assets/data``: ``calibration.txt``, ``test.txt`` and ``train.txt.gz``, a sample of the
training split for recovery after pruning (the training chapters taken in the same hash order until
``TRAIN_SAMPLE_CHARS`` characters, kept in book order). The whole training split is rebuilt from the
package on demand (see ``assets/data/SOURCE.md``)::

    apt-get download r-cran-janeaustenr          # or: apt-get install r-cran-janeaustenr
    python -m shedder.dev.corpus --deb r-cran-janeaustenr_1.0.0-1_all.deb
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import re
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "assets"
DATA_DIR = ASSETS / "data"
PACKAGE = "r-cran-janeaustenr"
INSTALLED_DATA = Path("/usr/lib/R/site-library/janeaustenr/data")
#: Where an extracted copy of the .deb lives when the package is not installed system-wide.
CACHE_ROOT = Path.home() / ".cache" / "shedder" / PACKAGE
NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
#: Target size of the test and of the calibration split (characters); the rest is training text.
SPLIT_CHARS = 250_000
SPLITS = ("train", "calibration", "test")
#: Size of the shipped training sample (characters): recovery text that is never test text.
TRAIN_SAMPLE_CHARS = 1_000_000
TRAIN_SAMPLE = DATA_DIR / "train.txt.gz"

_CHAPTER = re.compile(r"^\s*chapter\s+([0-9]+|[ivxlc]+)\.?\s*$", re.IGNORECASE)


# --- reading the R lazy-load database -------------------------------------------------------------

def _read_character_vector(blob: bytes) -> list[str]:
    """Decode an R-serialized character vector (XDR format 'X', version 2 or 3)."""
    if blob[:2] != b"X\n":
        raise ValueError("not an XDR R serialization")
    pos = 2
    version = struct.unpack_from(">i", blob, pos)[0]
    pos += 12  # version, writer R version, minimal reader R version
    if version == 3:
        (n,) = struct.unpack_from(">i", blob, pos)
        pos += 4 + n  # native encoding name
    flags, length = struct.unpack_from(">ii", blob, pos)
    pos += 8
    if flags & 0xFF != 16 or flags & 0x200:
        raise ValueError(f"expected a plain character vector, got SEXP flags {flags:#x}")
    out = []
    for _ in range(length):
        _flags, n = struct.unpack_from(">ii", blob, pos)
        pos += 8
        if n < 0:  # NA_character_
            out.append("")
            continue
        out.append(blob[pos:pos + n].decode("utf-8", errors="replace"))
        pos += n
    return out


def _read_rdx_index(rdx: bytes) -> dict[str, tuple[int, int]]:
    """Offsets of each variable in Rdata.rdb, from the gzip'ed index list in Rdata.rdx.

    The index is a named list whose first element ('variables') is a named list of (offset, length)
    integer pairs. Rather than decoding R lists in general, pair the names (stored after the values)
    with the integer vectors in order, which is all this package's index contains.
    """
    blob = gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx[4:])
    pairs = [struct.unpack_from(">ii", blob, m.end()) for m in re.finditer(rb"\x00\x00\x00\x0d\x00\x00\x00\x02", blob)]
    names = [n.decode() for n in re.findall(rb"\x00\x04\x00\x09\x00\x00\x00.([a-z]+)", blob, re.DOTALL)]
    novels = [n for n in names if n in NOVELS]
    if len(novels) != len(NOVELS) or len(pairs) < len(NOVELS):
        raise ValueError(f"unexpected index in {PACKAGE}: names={names}")
    return dict(zip(novels, pairs))


def read_novels(data_dir: Path) -> dict[str, list[str]]:
    """The six novels as lists of printed lines, from the package's ``data`` directory."""
    index = _read_rdx_index((data_dir / "Rdata.rdx").read_bytes())
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    novels = {}
    for name in NOVELS:
        offset, length = index[name]
        chunk = rdb[offset:offset + length]
        novels[name] = _read_character_vector(zlib.decompress(chunk[4:]))
    return novels


def package_data_dir(deb: Path | None = None) -> Path:
    """Locate the package's data: installed, cached, or extracted now from a given/downloaded .deb."""
    if deb is None:
        for candidate in (INSTALLED_DATA, CACHE_ROOT / INSTALLED_DATA.relative_to("/")):
            if (candidate / "Rdata.rdb").exists():
                return candidate
        with tempfile.TemporaryDirectory() as tmp:
            try:
                subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, check=True, capture_output=True)
            except (OSError, subprocess.CalledProcessError) as exc:
                raise RuntimeError(
                    f"Corpus package not found. Install it with `apt-get install {PACKAGE}` "
                    f"or fetch it with `apt-get download {PACKAGE}` and pass --deb FILE."
                ) from exc
            return package_data_dir(next(Path(tmp).glob("*.deb")))
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(CACHE_ROOT)], check=True)
    return CACHE_ROOT / INSTALLED_DATA.relative_to("/")


# --- cleaning and splitting -----------------------------------------------------------------------

def _paragraphs(lines: list[str]) -> list[str]:
    """Join wrapped lines into paragraphs; drop the italics underscores of the Gutenberg text."""
    paras, current = [], []
    for line in lines + [""]:
        line = line.strip()
        if line:
            current.append(line)
        elif current:
            paras.append(re.sub(r"\s+", " ", " ".join(current)).replace("_", ""))
            current = []
    return paras


def chapters(novels: dict[str, list[str]]) -> list[str]:
    """Every chapter of every novel as text: heading line, then paragraphs separated by blank lines.

    Title pages and volume headings before a novel's first chapter are dropped.
    """
    out = []
    for lines in novels.values():
        current: list[str] | None = None
        for line in lines:
            if _CHAPTER.match(line):
                if current:
                    out.append(current)
                current = [line]
            elif current is not None and not re.match(r"^\s*(VOLUME|END OF|THE END)", line):
                current.append(line)
        if current:
            out.append(current)
    return ["\n\n".join(_paragraphs(ch)) for ch in out]


def split_chapters(chs: list[str]) -> dict[str, list[str]]:
    """Deterministic test / calibration / train assignment by chapter hash (see module docstring)."""
    ranked = sorted(chs, key=_rank)
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    sizes = {"test": 0, "calibration": 0}
    for text in ranked:
        name = next((s for s in ("test", "calibration") if sizes[s] < SPLIT_CHARS), "train")
        splits[name].append(text)
        if name in sizes:
            sizes[name] += len(text)
    # Keep the book order inside each split so passages read naturally.
    order = {t: i for i, t in enumerate(chs)}
    return {s: sorted(v, key=order.__getitem__) for s, v in splits.items()}


def _rank(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def train_sample(train_chapters: list[str], chars: int = TRAIN_SAMPLE_CHARS) -> list[str]:
    """The shipped sample of the training split: its chapters in hash order until ``chars``
    characters, then back in book order (the same rule that cut the test and calibration splits)."""
    taken, size = set(), 0
    for text in sorted(train_chapters, key=_rank):
        if size >= chars:
            break
        taken.add(text)
        size += len(text)
    return [t for t in train_chapters if t in taken]


def _join(chs: list[str]) -> str:
    return "\n\n\n".join(chs) + "\n"


def build_splits(deb: Path | None = None) -> dict[str, str]:
    """All three splits as text, and the shipped training sample; chapters are separated by three newlines."""
    splits = split_chapters(chapters(read_novels(package_data_dir(deb))))
    texts = {name: _join(chs) for name, chs in splits.items()}
    texts["train_sample"] = _join(train_sample(splits["train"]))
    return texts


def load_split(name: str, train_dir: Path = CACHE_ROOT) -> str:
    """Text of one split: the shipped file for calibration/test, the rebuilt cache for train."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
    path = (train_dir if name == "train" else DATA_DIR) / f"{name}.txt"
    if not path.exists():
        write_splits(train_dir=train_dir)
    return path.read_text(encoding="utf-8")


def write_splits(deb: Path | None = None, train_dir: Path = CACHE_ROOT) -> dict[str, Path]:
    """Rebuild the splits: calibration/test and the training sample into assets/data, train into the
    cache directory."""
    paths = {}
    texts = build_splits(deb)
    TRAIN_SAMPLE.write_bytes(gzip.compress(texts.pop("train_sample").encode("utf-8"), mtime=0))
    paths["train_sample"] = TRAIN_SAMPLE
    for name, text in texts.items():
        path = (train_dir if name == "train" else DATA_DIR) / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        paths[name] = path
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deb", type=Path, help=f"a downloaded {PACKAGE} .deb (default: installed or apt-get download)")
    parser.add_argument("--train-dir", type=Path, default=CACHE_ROOT, help="where train.txt is written")
    args = parser.parse_args()
    for name, path in write_splits(args.deb, args.train_dir).items():
        print(f"{name:12s} {path.stat().st_size:>9,d} bytes  {path}")


if __name__ == "__main__":
    main()
