"""Users' corrections ("that's wrong, it is a 7"): stored in SQLite, exported as IDX or PNG, and learned by fine-tuning."""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import DigitrecError, FeedbackFullError

if TYPE_CHECKING:
    import torch

    from .data import MNIST
    from .training import Run

SCHEMA_VERSION = 1
# Each correction keeps the bytes the user sent, up to the server's 5 MB a request: without a limit one client
# posting padded images filled the disk at 50 MB/s. 1 GB holds over 100,000 corrections drawn on the page.
DEFAULT_MAX_MB = 1024
MAX_PAGE_COUNT = 2**32 - 2  # SQLite's largest max_page_count
SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at    TEXT    NOT NULL,                          -- ISO 8601, UTC
    label         INTEGER NOT NULL CHECK (label BETWEEN 0 AND 9),
    predicted     INTEGER CHECK (predicted BETWEEN 0 AND 9), -- NULL when the model was not sure
    model_name    TEXT,
    model_version TEXT,
    image         BLOB    NOT NULL,                          -- the bytes the user sent (PNG, JPEG, ...)
    input28       BLOB    NOT NULL CHECK (length(input28) = 784)  -- the 28x28 uint8 image the model saw
);
-- COUNT(*) and the counts by label read this small index instead of every row's images: 30-40 ms a correction
-- at 20,000 stored (each answer says how many there are), 0.2-1 ms with it. Added to older databases on opening.
CREATE INDEX IF NOT EXISTS feedback_label ON feedback (label);
"""


# The recipe name finetune records: the model's own with +feedback (trained with corrections) or +finetune
# (--no-corrections, MNIST alone).
FEEDBACK_SUFFIX, MNIST_ONLY_SUFFIX = "+feedback", "+finetune"


def finetune_recipe(recipe: str, corrections: bool) -> str:
    """The recipe name a fine-tune of a `recipe` model records (with or without corrections)."""
    return recipe + (FEEDBACK_SUFFIX if corrections else MNIST_ONLY_SUFFIX)


def finetune_base(recipe: str) -> str | None:
    """The recipe of the model a fine-tune named `recipe` started from; None when `recipe` is no fine-tune's."""
    return recipe.rsplit("+", 1)[0] if recipe.endswith((FEEDBACK_SUFFIX, MNIST_ONLY_SUFFIX)) else None


def is_finetune(meta: dict) -> bool:
    """Did `digitrec finetune` write this checkpoint metadata? It records `finetuned_from` at the top (a
    model.safetensors) or under `extra` (a last.safetensors), and its recipe name ends in +feedback or +finetune
    (all an older fine-tune records)."""
    extra = meta.get("extra")
    return (
        meta.get("finetuned_from") is not None
        or (isinstance(extra, dict) and extra.get("finetuned_from") is not None)
        or finetune_base(str(meta.get("recipe", ""))) is not None
    )


def recipe_lr(meta: dict, lr: float) -> float:
    """The learning rate of the recipe a model was trained with, `lr` being its config's. A fine-tune's config
    holds its own scaled rate, so `finetune` of a fine-tune scaled it again (0.022, 0.0022, 0.00022) and learned
    nothing; it recorded its `lr_scale`, and an older fine-tune (the bundled model's) names its recipe."""
    from .config import RECIPES

    scale = meta.get("lr_scale")
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0:
        return lr / scale
    if is_finetune(meta):
        name = str(meta.get("recipe", ""))
        while (started := finetune_base(name)) is not None:
            name = started
        if name in RECIPES:
            return RECIPES[name].lr
    return lr


def db_path(path: str | Path | None = None) -> Path:
    """`path` with ~ expanded, or default_db_path() when None."""
    return Path(path).expanduser() if path else default_db_path()


def default_db_path() -> Path:
    """$DIGITREC_FEEDBACK_DB, else $XDG_DATA_HOME/digitrec/feedback.sqlite (~/.local/share by default)."""
    if os.environ.get("DIGITREC_FEEDBACK_DB"):
        return Path(os.environ["DIGITREC_FEEDBACK_DB"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "digitrec" / "feedback.sqlite"


@dataclass(frozen=True)
class Correction:
    id: int
    created_at: str
    label: int
    predicted: int | None
    model_name: str | None
    model_version: str | None
    image: bytes
    input28: np.ndarray  # (28, 28) uint8, white ink on black


class FeedbackStore:
    """One SQLite file in WAL mode: readers never block the writer, and several processes may write at once.

    Every call opens its own short-lived connection, so one store can be shared by any number of threads.
    Each correction is committed with synchronous=FULL before `add` returns, so killing the server loses nothing
    it has acknowledged.
    """

    def __init__(
        self, path: str | Path | None = None, *, read_only: bool = False, max_mb: float = DEFAULT_MAX_MB
    ):
        self.path = db_path(path)
        self.read_only = read_only
        self.max_mb = max_mb  # `add` refuses a correction that would take the database past this size
        if read_only or (self.path.is_file() and self.path.stat().st_size > 0):
            self._check_feedback_table(required=read_only)  # reads only: nothing is written to a refused file
        if read_only:
            return
        try:
            self._create()
        except sqlite3.DatabaseError as exc:
            raise DigitrecError(
                f"cannot open feedback database {self.path} ({exc}); pass another path with --feedback-db."
            ) from None
        except OSError as exc:
            raise DigitrecError(
                f"cannot create feedback database {self.path} ({exc.strerror}); pass another path with --feedback-db."
            ) from None

    @classmethod
    def existing(cls, path: str | Path | None = None) -> FeedbackStore:
        """The store at `path` (default_db_path() when None), which must exist already and hold the feedback table,
        opened read-only: for commands that only read corrections, so that a mistyped path is an error rather than
        a new, empty database, and another program's database is refused rather than changed."""
        path = db_path(path)
        if path.is_dir():  # was "no feedback database at DIR", though something is there
            raise DigitrecError(
                f"{path} is a folder, not a feedback database; pass the .sqlite file `digitrec serve` wrote."
            )
        if not path.is_file():
            raise DigitrecError(
                f"no feedback database at {path}; `digitrec serve` creates it when it starts, "
                "or pass the right path with --feedback-db."
            )
        return cls(path, read_only=True)

    def _check_feedback_table(self, required: bool) -> None:
        """Refuse, without changing it, a file that is not a database or is some other program's: a database whose
        feedback table lacks our columns, or (when `required`, for the reading commands; or when it holds other
        tables, for the server) has none. Nothing creates our table in it or switches its journal mode."""
        try:
            with closing(self._read_only_connection()) as con:
                tables = {
                    row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                }
                columns = {row[1] for row in con.execute("PRAGMA table_info(feedback)")}
        except sqlite3.DatabaseError as exc:
            raise DigitrecError(
                f"cannot open feedback database {self.path} ({exc}); pass another path with --feedback-db."
            ) from None
        ours = {"id", "created_at", "label", "predicted", "model_name", "model_version", "image", "input28"}
        if "feedback" in tables and not ours <= columns:
            raise DigitrecError(
                f"{self.path} has a feedback table without the columns `digitrec serve` writes "
                f"({', '.join(sorted(ours - columns))}), so it is another program's; pass the right path with "
                "--feedback-db."
            )
        if "feedback" not in tables and (required or tables - {"sqlite_sequence"}):
            raise DigitrecError(
                f"{self.path} is an SQLite database without a feedback table, not one `digitrec serve` wrote; "
                "pass the right path with --feedback-db."
            )

    def _read_only_connection(self) -> sqlite3.Connection:
        """A connection that changes no rows and leaves the folder as it found it.

        Reading a WAL database makes -wal and -shm files beside it, and only a connection that may write removes
        them when it closes last (folding in what a writer committed meanwhile, as the writer's own close would).
        So where neither a -wal nor a -journal file is there and we may write the file, this is a read-write
        connection with query_only=ON (SQLite refuses every change through it); otherwise (a writer is at work or
        left its files, or the file is not ours to write) it is mode=ro, which leaves them alone.
        """
        busy = any(self.path.with_name(self.path.name + end).exists() for end in ("-wal", "-journal"))
        if busy or not os.access(self.path, os.W_OK):
            return sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0)
        # mode=rw: never creates the file, should it vanish after the caller looked
        con = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=rw", uri=True, timeout=30.0)
        con.execute("PRAGMA query_only=ON")
        return con

    def _create(self) -> None:
        """The database file with its table, in WAL mode; what is there already is kept."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._open()) as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(SCHEMA)
            con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _open(self) -> sqlite3.Connection:
        # A long timeout makes concurrent writers wait for the lock instead of failing with "database is locked".
        con = sqlite3.connect(self.path, timeout=30.0)
        con.execute("PRAGMA synchronous=FULL")
        return con

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            return self._read_only_connection()
        if not self.path.exists():
            # Moved away or deleted while the server runs (the 507 asks the operator to start a new database):
            # a new one starts, as at start-up. Was: SQLite made an empty file, and every correction and every
            # /api/stats failed with "no such table" until a restart.
            self._create()
        return self._open()

    def add(
        self,
        *,
        label: int,
        image: bytes,
        input28: np.ndarray,
        predicted: int | None = None,
        model_name: str | None = None,
        model_version: str | None = None,
    ) -> int:
        """Store one correction and return its id. `input28` is (28, 28) in [0, 1] (float) or 0-255 (uint8)."""
        pixels = np.asarray(input28)
        if pixels.dtype != np.uint8:
            pixels = np.clip(np.rint(pixels.astype(np.float32) * 255), 0, 255).astype(np.uint8)
        if pixels.size != 784:
            raise ValueError(f"input28 must hold 28x28 pixels, got shape {pixels.shape}")
        created_at = datetime.now(UTC).isoformat(timespec="milliseconds")
        try:
            with closing(self._connect()) as con, con:
                # SQLite itself refuses to grow the file past this many pages (SQLITE_FULL), atomically however
                # many writers there are; deleted rows leave free pages that new ones reuse
                page_size = con.execute("PRAGMA page_size").fetchone()[0]
                # at most SQLite's own ceiling (2**32 - 2 pages): --feedback-max-mb inf means no limit
                pages = int(min(self.max_mb * 1024 * 1024 / page_size, MAX_PAGE_COUNT))  # inf // n is nan
                con.execute(f"PRAGMA max_page_count = {max(1, pages)}")
                cursor = con.execute(
                    "INSERT INTO feedback (created_at, label, predicted, model_name, model_version, image, input28)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        created_at,
                        int(label),
                        predicted,
                        model_name,
                        model_version,
                        bytes(image),
                        pixels.tobytes(),
                    ),
                )
                assert cursor.lastrowid is not None  # set by the INSERT above
                row_id = int(cursor.lastrowid)
        except sqlite3.OperationalError as exc:
            # SQLITE_FULL (13): from the INSERT at the size limit, or from the COMMIT on a full disk (a small
            # correction's new pages reach the file only then); Python 3.10's exception has only SQLite's words
            if getattr(exc, "sqlite_errorcode", 13) != 13 or "full" not in str(exc):
                raise
            raise self._full(len(image)) from None
        return row_id

    def _full(self, needed: int) -> FeedbackFullError:
        """The sentence for a correction of `needed` bytes that SQLite had no room for (SQLITE_FULL): the disk is
        full, or else the database has reached its limit."""
        if shutil.disk_usage(self.path.parent).free < needed + 1024 * 1024:
            return FeedbackFullError(
                "the disk that holds the feedback database is full, so the correction was not stored; free some "
                "space on the server."
            )
        return FeedbackFullError(
            f"the feedback database has reached its limit of {self.max_mb:g} MB, so the correction was not "
            "stored; the server's operator can export the corrections and start a new database, or raise "
            "--feedback-max-mb."
        )

    def count(self) -> int:
        with closing(self._connect()) as con:
            return con.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]

    def counts_by_label(self) -> dict[int, int]:
        with closing(self._connect()) as con:
            rows = con.execute("SELECT label, COUNT(*) FROM feedback GROUP BY label").fetchall()
        return {digit: 0 for digit in range(10)} | {int(label): n for label, n in rows}

    def corrections(self) -> Iterator[Correction]:
        """Every correction, oldest first."""
        with closing(self._connect()) as con:
            rows = con.execute(
                "SELECT id, created_at, label, predicted, model_name, model_version, image, input28 FROM feedback ORDER BY id"
            )
            for row in rows:
                *head, pixels = row
                yield Correction(*head, input28=np.frombuffer(pixels, dtype=np.uint8).reshape(28, 28))  # type: ignore[misc]  # head is the fields before input28

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All corrections as MNIST-shaped uint8 images (N, 28, 28) and int64 labels (N,), for fine-tuning."""
        import torch  # here, not at the top: the server and `feedback export` never need it

        items = list(self.corrections())
        images = np.stack([c.input28 for c in items]) if items else np.zeros((0, 28, 28), np.uint8)
        labels = np.array([c.label for c in items], dtype=np.int64)
        return torch.from_numpy(images.copy()), torch.from_numpy(labels)


def export_idx(store: FeedbackStore, out_dir: str | Path) -> tuple[Path, Path]:
    """Write the corrections as MNIST-format files feedback-images-idx3-ubyte and feedback-labels-idx1-ubyte."""
    from .checkpoint import atomic_write_bytes
    from .data import to_idx

    images, labels = store.tensors()
    out_dir = Path(out_dir)
    images_path, labels_path = out_dir / "feedback-images-idx3-ubyte", out_dir / "feedback-labels-idx1-ubyte"
    atomic_write_bytes(images_path, to_idx(images.numpy()))
    atomic_write_bytes(labels_path, to_idx(labels.numpy().astype(np.uint8)))
    return images_path, labels_path


def export_png(store: FeedbackStore, out_dir: str | Path, originals: bool = False) -> int:
    """Write each correction as OUT/<label>/<id>.png (28x28, what the model saw); with `originals`, also the
    bytes the user sent as OUT/originals/<id>.<ext>. Returns how many corrections were written."""
    from PIL import Image

    from .checkpoint import atomic_write_files

    out_dir = Path(out_dir)
    written = 0
    for item in store.corrections():
        png = io.BytesIO()
        Image.fromarray(item.input28).save(png, format="PNG")
        # Each file through a temporary sibling renamed over it: plain writes followed a link someone left at its
        # path and overwrote the file it points to. No fsync: an export is cheap to re-run, and one per file is slow.
        files = {_own_folder(out_dir, str(item.label)) / f"{item.id}.png": png.getvalue()}
        if originals:
            files[_own_folder(out_dir, "originals") / f"{item.id}.{_extension(item.image)}"] = item.image
        atomic_write_files(files, durable=False)
        written += 1
    return written


def _own_folder(out_dir: Path, name: str) -> Path:
    """OUT/name, made if missing, and refused if it is a symbolic link: in a folder others may write (/tmp), a
    link someone left there would send the export into a folder of their choosing."""
    folder = out_dir / name
    if folder.is_symlink():
        raise DigitrecError(
            f"{folder} is a symbolic link, so the export does not write into it; export into a folder of your own."
        )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _extension(data: bytes) -> str:
    """The usual file extension for an image's bytes, from its magic number."""
    for magic, ext in (
        (b"\x89PNG", "png"),
        (b"\xff\xd8", "jpg"),
        (b"GIF8", "gif"),
        (b"RIFF", "webp"),
        (b"BM", "bmp"),
    ):
        if data.startswith(magic):
            return ext
    return "bin"


MAX_REPEATED = 600_000  # corrections x --repeat: ten times MNIST's training set is already most of an epoch


def finetune(
    model_path: str | Path,
    feedback_db: str | Path | None,
    out_dir: str | Path,
    *,
    data: MNIST,
    epochs: float = 1.0,
    lr_scale: float = 0.1,
    repeat: int = 20,
    corrections: bool = True,
    progress: bool = False,
    report: bool = True,
    log=print,
) -> Run:
    """Continue training `model_path` on MNIST's training set plus the corrections, each shown `repeat` times
    per epoch, at `lr_scale` times the recipe's learning rate with a cosine decay; write a new run folder.

    This is `digitrec train` (train.train) started from the checkpoint's weights on the enlarged training set,
    with no validation split so every correction is trained on. The metrics add how many corrections the
    model reads right before and after. With `corrections=False` it trains on MNIST alone (`feedback_db` is
    not read): the bundled model is made this way, one such epoch after its recipe (DEVELOPERS.md).
    """
    import hashlib
    from dataclasses import replace

    import torch

    from .checkpoint import load_model
    from .config import TrainConfig
    from .evaluate import evaluate
    from .training import train

    # the flags first: a bad --epochs was told only after "the database holds no corrections"
    if repeat < 1:  # each said with its flag and value: one sentence named all three whichever was wrong
        raise DigitrecError(f"--repeat must be at least 1, got {repeat}.")
    for flag, value in (("--epochs", epochs), ("--lr-scale", lr_scale)):
        if not value > 0:  # NaN too
            raise DigitrecError(f"{flag} must be above 0, got {value}.")
    model, meta = load_model(model_path)
    if "members" in meta:
        raise DigitrecError(
            f"{model_path} is an ensemble; fine-tune each member, then join them again with `digitrec ensemble`."
        )
    if corrections:
        store = FeedbackStore.existing(feedback_db)
        images, labels = store.tensors()
        if len(images) == 0:
            raise DigitrecError(
                f"{store.path} holds no corrections yet; send some from the web page (`digitrec serve`) first, "
                "or fine-tune on MNIST alone with --no-corrections."
            )
    else:
        images, labels = torch.zeros((0, 28, 28), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    if len(images) * repeat > MAX_REPEATED:
        raise DigitrecError(
            f"--repeat {repeat} would add {len(images) * repeat:,} copies of the {len(images)} corrections, more "
            f"than {MAX_REPEATED:,} (ten times MNIST); choose --repeat {MAX_REPEATED // len(images)} or less."
        )
    base = TrainConfig.from_checkpoint(meta, model_path)
    config = base.override(
        epochs=epochs,
        lr=recipe_lr(meta, base.lr) * lr_scale,
        schedule="cosine",
        val_size=0,
        early_stopping_patience=0,
    )
    accuracy_before = evaluate(model, images, labels, config)[1] if corrections else None
    # The data checksum covers the corrections too, so two fine-tunes on different feedback never look alike.
    digest = hashlib.md5(
        data.checksum.encode() + images.numpy().tobytes() + labels.numpy().tobytes()
    ).hexdigest()
    enlarged = replace(
        data,
        train_images=torch.cat([data.train_images, images.repeat(repeat, 1, 1)]),
        train_labels=torch.cat([data.train_labels, labels.to(data.train_labels.dtype).repeat(repeat)]),
        checksum=digest,
    )
    added = f" + {len(images)} corrections x {repeat}" if corrections else ""
    log(f"fine-tuning {model_path} on {len(data.train_images):,} MNIST images{added}")
    # What the model card needs to say what this run trained on and how to run it again (modelcard._finetune):
    # the data checksum above is no longer MNIST's, and the enlarged training set is no longer MNIST's size.
    extra: dict = {
        "finetuned_from": str(model_path),
        "lr_scale": lr_scale,
        "mnist": {"images": len(data.train_images), "checksum": data.checksum},
    }
    if corrections:
        extra["feedback"] = {"corrections": len(images), "repeat": repeat, "database": str(store.path)}

    def feedback_metrics(model: torch.nn.Module) -> dict:
        """What the fine-tune adds to the run's metrics, from its best model (train() writes them with its own)."""
        return {
            "test_accuracy_before": (meta.get("metrics") or {}).get("test_accuracy"),
            "feedback_corrections": len(images),
            "feedback_accuracy_before": accuracy_before,
            "feedback_accuracy": evaluate(model, images, labels, config)[1] if corrections else None,
        }

    with torch.enable_grad():  # training needs autograd, also when the caller has it off (torch.no_grad())
        run = train(
            config,
            out_dir,
            recipe=finetune_recipe(str(meta.get("recipe", "custom")), bool(corrections)),
            data=enlarged,
            progress=progress,
            report=report,
            log=log,
            init_weights=model.state_dict(),
            extra_metadata=extra,
            more_metrics=feedback_metrics,
            lr_flag=f"--lr-scale, now {lr_scale:g}",
        )
    return run
