"""The corrections store: what is written can be read and exported, by many writers at once, and survives a kill."""

from __future__ import annotations

import multiprocessing
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digitrec import feedback
from digitrec.config import get_recipe
from digitrec.data import parse_idx
from digitrec.errors import DigitrecError
from digitrec.feedback import FeedbackStore, export_idx, export_png


def glyph(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)


def add(store: FeedbackStore, label: int, seed: int = 0) -> int:
    return store.add(
        label=label,
        image=b"\x89PNG fake %d" % seed,
        input28=glyph(seed),
        predicted=(label + 1) % 10,
        model_name="m",
        model_version="v1",
    )


def test_corrections_come_back_as_they_were_stored(tmp_path):
    store = FeedbackStore(tmp_path / "sub" / "feedback.sqlite")  # parent folders are created
    ids = [add(store, label, seed) for seed, label in enumerate([3, 3, 8])]
    assert ids == [1, 2, 3] and store.count() == 3
    assert store.counts_by_label() == {d: {3: 2, 8: 1}.get(d, 0) for d in range(10)}
    items = list(store.corrections())
    assert [c.label for c in items] == [3, 3, 8] and [c.predicted for c in items] == [4, 4, 9]
    assert items[2].image == b"\x89PNG fake 2" and (items[2].input28 == glyph(2)).all()
    assert items[0].model_version == "v1" and items[0].created_at.endswith("+00:00")
    images, labels = store.tensors()
    assert (
        images.shape == (3, 28, 28)
        and images.dtype.is_floating_point is False
        and labels.tolist() == [3, 3, 8]
    )


def test_float_inputs_are_stored_as_0_to_255(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")
    store.add(label=1, image=b"x", input28=np.full((28, 28), 0.5, np.float32))
    assert (next(store.corrections()).input28 == 128).all()


def test_the_database_uses_wal_so_readers_do_not_block_writers(tmp_path):
    path = tmp_path / "f.sqlite"
    FeedbackStore(path)
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_every_connection_syncs_fully_so_an_acknowledged_correction_survives_a_power_cut(tmp_path):
    """WAL with synchronous=NORMAL or OFF may lose the last commits on power loss; the store asks for FULL (2)."""
    store = FeedbackStore(tmp_path / "f.sqlite")
    with closing(store._connect()) as con:
        assert con.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_a_database_moved_away_while_the_server_runs_is_started_again(tmp_path):
    """The 507 asks the operator to export the corrections and start a new database; moving the file aside made
    SQLite leave an empty file, and every correction and count failed with "no such table" until a restart."""
    path = tmp_path / "f.sqlite"
    store = FeedbackStore(path)
    add(store, 3)
    aside = tmp_path / "aside"
    aside.mkdir()
    for file in tmp_path.glob("f.sqlite*"):
        file.rename(aside / file.name)
    assert store.count() == 0 and store.counts_by_label()[3] == 0
    assert add(store, 5, seed=1) == 1 and [c.label for c in store.corrections()] == [5]
    with sqlite3.connect(path) as con:  # the new file is the store's own: WAL, like one made at start-up
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert FeedbackStore.existing(aside / "f.sqlite").count() == 1  # the old one holds what it held


def _write_many(path: str, worker: int, count: int) -> None:
    store = FeedbackStore(path)
    for i in range(count):
        add(store, (worker + i) % 10, seed=worker * 1000 + i)


def test_concurrent_writers_from_threads_and_processes_lose_nothing(tmp_path):
    path = str(tmp_path / "f.sqlite")
    FeedbackStore(path)
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_write_many, args=(path, w, 25)) for w in range(3)]
    threads = [threading.Thread(target=_write_many, args=(path, 10 + w, 25)) for w in range(3)]
    for worker in processes + threads:
        worker.start()
    for worker in processes + threads:
        worker.join(timeout=60)
    assert all(p.exitcode == 0 for p in processes)
    store = FeedbackStore(path)
    assert store.count() == 150
    assert len({c.image for c in store.corrections()}) == 150


def test_killing_the_writer_keeps_every_acknowledged_correction(tmp_path):
    path = tmp_path / "f.sqlite"
    script = textwrap.dedent(f"""
        import numpy as np
        from digitrec.feedback import FeedbackStore
        store = FeedbackStore({str(path)!r})
        while True:
            row = store.add(label=5, image=b"img", input28=np.zeros((28, 28), np.uint8))
            print(row, flush=True)
    """)
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    acknowledged = [int(writer.stdout.readline()) for _ in range(30)]
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=10)
    store = FeedbackStore(path)
    assert set(acknowledged) <= {c.id for c in store.corrections()}
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_export_idx_writes_mnist_format_files(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")
    for seed, label in enumerate([2, 9, 0]):
        add(store, label, seed)
    images_path, labels_path = export_idx(store, tmp_path / "out")
    images = parse_idx(images_path.read_bytes())
    labels = parse_idx(labels_path.read_bytes())
    assert images.shape == (3, 28, 28) and (images[1] == glyph(1)).all()
    assert labels.tolist() == [2, 9, 0]


def test_export_png_writes_one_folder_per_label(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")
    for seed, label in enumerate([4, 4, 7]):
        add(store, label, seed)
    assert export_png(store, tmp_path / "out", originals=True) == 3
    assert sorted(p.name for p in (tmp_path / "out" / "4").iterdir()) == ["1.png", "2.png"]
    assert (np.asarray(Image.open(tmp_path / "out" / "7" / "3.png")) == glyph(2)).all()
    assert (tmp_path / "out" / "originals" / "3.png").read_bytes() == b"\x89PNG fake 2"


def test_an_unusable_database_path_is_one_clear_error(tmp_path):
    (tmp_path / "notes.sqlite").write_text(
        "this is not a database, just text that is long enough to matter " * 20
    )
    with pytest.raises(DigitrecError, match="--feedback-db"):
        FeedbackStore(tmp_path / "notes.sqlite")
    with pytest.raises(DigitrecError, match="--feedback-db"):
        FeedbackStore(tmp_path / "notes.sqlite" / "inside.sqlite")


def test_export_from_the_command_line(tmp_path, capsys):
    from digitrec.cli import main

    store = FeedbackStore(tmp_path / "f.sqlite")
    add(store, 6)
    assert main(["feedback", "export", "--feedback-db", str(store.path), "--out", str(tmp_path / "idx")]) == 0
    assert "1 corrections" in capsys.readouterr().out
    assert parse_idx((tmp_path / "idx" / "feedback-labels-idx1-ubyte").read_bytes()).tolist() == [6]
    assert (
        main(
            [
                "feedback",
                "export",
                "--feedback-db",
                str(store.path),
                "--format",
                "png",
                "--out",
                str(tmp_path / "png"),
            ]
        )
        == 0
    )
    assert (tmp_path / "png" / "6" / "1.png").exists()


def tiny_mnist(n: int = 256):
    """Random stand-in for MNIST (the fine-tuning mechanics do not need real digits)."""
    import torch

    from digitrec.data import MNIST

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
    return MNIST(images, labels, images[:64], labels[:64], source="synthetic", checksum="0" * 32)


def test_finetune_learns_the_corrections_and_writes_a_loadable_checkpoint(tmp_path):
    import torch

    from digitrec.checkpoint import save_model
    from digitrec.feedback import finetune
    from digitrec.models import create_model
    from digitrec.predict import Predictor

    torch.manual_seed(0)
    config = {
        "arch": "fast_cnn",
        "batch_size": 64,
        "lr": 0.002,
        "device": "cpu",
        "augment": "none",
        "threads": 1,
    }
    save_model(
        tmp_path / "base.safetensors",
        create_model("fast_cnn").eval(),
        {"recipe": "tiny", "config": config, "metrics": {"test_accuracy": 0.5}},
    )
    store = FeedbackStore(tmp_path / "f.sqlite")
    for seed in range(5):  # five odd glyphs that users all said were a 3
        store.add(label=3, image=b"png", input28=glyph(100 + seed))
    threads = torch.get_num_threads()
    try:
        run = finetune(
            tmp_path / "base.safetensors",
            store.path,
            tmp_path / "tuned",
            data=tiny_mnist(),
            epochs=4,
            lr_scale=1.0,
            repeat=20,
            report=False,
            log=lambda msg: None,
        )
    finally:
        torch.set_num_threads(threads)  # the config's threads=1 must not leak into other tests
    m = run.metrics
    assert m["feedback_corrections"] == 5 and m["feedback_accuracy"] == 1.0 > m["feedback_accuracy_before"]
    tuned = Predictor.load(tmp_path / "tuned" / "model.safetensors")
    assert tuned.meta["finetuned_from"].endswith("base.safetensors") and tuned.name == "tiny+feedback"
    # what its model card needs: the command's --lr-scale and database, and MNIST's own size and checksum,
    # which the enlarged training set and the checksum mixed with the corrections no longer show
    assert tuned.meta["lr_scale"] == 1.0 and tuned.meta["mnist"] == {"images": 256, "checksum": "0" * 32}
    assert tuned.meta["feedback"] == {"corrections": 5, "repeat": 20, "database": str(store.path)}
    data = (tmp_path / "tuned" / "model.safetensors").read_bytes()  # it carries its own checksum
    assert b'"digitrec_sha256":"' in data[8 : 8 + int.from_bytes(data[:8], "little")]
    x = torch.from_numpy(np.stack([glyph(100 + s) for s in range(5)])).float().div(255).unsqueeze(1)
    assert [p.top[0][0] for p in tuned.predict_tensor(x)] == [3] * 5


def test_finetune_without_corrections_says_what_to_do(tmp_path):
    from digitrec.checkpoint import save_model
    from digitrec.feedback import finetune
    from digitrec.models import create_model

    save_model(
        tmp_path / "base.safetensors",
        create_model("fast_cnn"),
        {"recipe": "tiny", "config": {"arch": "fast_cnn"}},
    )
    FeedbackStore(tmp_path / "empty.sqlite")  # a database that holds no corrections
    with pytest.raises(DigitrecError, match="no corrections yet"):
        finetune(
            tmp_path / "base.safetensors", tmp_path / "empty.sqlite", tmp_path / "out", data=tiny_mnist()
        )
    with pytest.raises(DigitrecError, match="no feedback database at .*missing.sqlite"):
        finetune(
            tmp_path / "base.safetensors", tmp_path / "missing.sqlite", tmp_path / "out", data=tiny_mnist()
        )
    assert not (tmp_path / "missing.sqlite").exists()  # a mistyped path is not created
    with pytest.raises(DigitrecError, match=f"^{tmp_path} is a folder, not a feedback database; "):
        finetune(tmp_path / "base.safetensors", tmp_path, tmp_path / "out", data=tiny_mnist())
    # a bad flag is said first, not after "no corrections yet" (which sent the user to --no-corrections)
    for flags, said in [
        ({"epochs": 0}, "--epochs must be above 0, got 0"),
        ({"lr_scale": -1.0}, "--lr-scale must be above 0, got -1.0"),
        ({"repeat": 0}, "--repeat must be at least 1, got 0"),
    ]:
        with pytest.raises(DigitrecError, match=said):
            finetune(
                tmp_path / "base.safetensors",
                tmp_path / "empty.sqlite",
                tmp_path / "out",
                data=tiny_mnist(),
                **flags,
            )
    store = FeedbackStore(tmp_path / "one.sqlite")
    store.add(label=3, image=b"png", input28=np.zeros((28, 28), np.uint8))
    with pytest.raises(DigitrecError, match="choose --repeat 600000 or less"):  # was a 15 TB allocation
        finetune(tmp_path / "base.safetensors", store.path, tmp_path / "out", data=tiny_mnist(), repeat=10**9)


def test_feedback_export_of_a_missing_database_is_an_error_and_creates_nothing(tmp_path, capsys):
    from digitrec.cli import main

    missing = tmp_path / "nonexist.sqlite"
    assert main(["feedback", "export", "--feedback-db", str(missing), "--out", str(tmp_path / "out")]) == 2
    assert "no feedback database at" in capsys.readouterr().err
    assert not missing.exists() and not (tmp_path / "out").exists()


def test_reading_commands_refuse_another_programs_database_and_leave_it_as_it_was(tmp_path, capsys):
    """export printed "0 corrections", exit 0, and added the feedback table and switched the file to WAL."""
    from digitrec.checkpoint import save_model
    from digitrec.cli import main
    from digitrec.feedback import finetune
    from digitrec.models import create_model

    save_model(tmp_path / "m.safetensors", create_model("fast_cnn"), {"config": {"arch": "fast_cnn"}})
    other = tmp_path / "other.sqlite"
    with closing(sqlite3.connect(other)) as con, con:
        con.execute("CREATE TABLE t (x)")
        con.execute("INSERT INTO t VALUES (1)")
    before, files = other.read_bytes(), sorted(tmp_path.iterdir())
    assert main(["feedback", "export", "--feedback-db", str(other), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{other} is an SQLite database without a feedback table" in err and len(err.splitlines()) == 1
    with pytest.raises(DigitrecError, match="without a feedback table"):
        finetune(tmp_path / "m.safetensors", other, tmp_path / "run", data=tiny_mnist())
    assert other.read_bytes() == before and sorted(tmp_path.iterdir()) == files  # no table, no WAL, no output


def test_export_opens_the_database_read_only(tmp_path, capsys):
    """export created what was missing (WAL mode, user_version) in the file it was only to read."""
    from digitrec.cli import main
    from digitrec.feedback import SCHEMA

    db = tmp_path / "rollback.sqlite"
    with closing(sqlite3.connect(db)) as con:
        con.executescript(SCHEMA)  # the table, in the rollback journal and without a user_version
    before = db.read_bytes()
    assert main(["feedback", "export", "--feedback-db", str(db), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.startswith(f"0 corrections from {db}")
    assert db.read_bytes() == before and not (tmp_path / "rollback.sqlite-wal").exists()


def test_reading_a_wal_database_leaves_the_folder_as_it_found_it(tmp_path, capsys):
    """export and finetune's store left -wal and -shm files beside a database that had none (a mode=ro
    connection cannot remove them)."""
    from digitrec.cli import main

    store = FeedbackStore(tmp_path / "f.sqlite")
    add(store, 3)
    before, files = store.path.read_bytes(), sorted(tmp_path.iterdir())
    assert [path.name for path in files] == ["f.sqlite"]
    assert FeedbackStore.existing(store.path).count() == 1
    out = tmp_path / "out"
    assert main(["feedback", "export", "--feedback-db", str(store.path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"1 corrections from {store.path}")
    assert store.path.read_bytes() == before
    assert sorted(tmp_path.iterdir()) == sorted([*files, out])


def test_a_database_not_ours_to_write_is_read_through_a_read_only_connection(tmp_path, monkeypatch):
    """Where the file is write-protected, a read-write connection would quietly open read-only and then could
    not remove its -wal and -shm files either; the store then asks for mode=ro, which says what it is."""
    import digitrec.feedback as feedback

    store = FeedbackStore(tmp_path / "f.sqlite")
    add(store, 3)
    opened: list[str] = []
    connect = sqlite3.connect
    monkeypatch.setattr(
        feedback.sqlite3, "connect", lambda database, **kw: opened.append(database) or connect(database, **kw)
    )
    monkeypatch.setattr(feedback.os, "access", lambda path, mode: True)
    assert FeedbackStore.existing(store.path).count() == 1 and opened[-1].endswith("?mode=rw")
    monkeypatch.setattr(feedback.os, "access", lambda path, mode: False)
    assert FeedbackStore.existing(store.path).count() == 1 and opened[-1].endswith("?mode=ro")


def test_a_reader_sees_what_a_running_writer_committed_and_leaves_the_writers_files(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")
    # a server in the middle of its work: the -wal and -shm files are its own
    with closing(store._connect()) as writer:
        writer.execute("BEGIN")
        writer.execute(
            "INSERT INTO feedback (created_at, label, image, input28) VALUES ('now', 4, x'00', zeroblob(784))"
        )
        writer.execute("COMMIT")
        wal = store.path.with_name("f.sqlite-wal")
        assert wal.exists()
        reader = FeedbackStore.existing(store.path)
        assert reader.count() == 1 and [c.label for c in reader.corrections()] == [4]
        assert wal.exists() and store.path.with_name("f.sqlite-shm").exists()
        add(store, 5)  # the writer's side goes on working
    assert reader.count() == 2


def test_readers_beside_writers_from_other_processes_see_every_commit_and_lose_none(tmp_path):
    path = str(tmp_path / "f.sqlite")
    FeedbackStore(path)
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_write_many, args=(path, w, 40)) for w in range(2)]
    for writer in writers:
        writer.start()
    seen = [0]
    before: set[int] = set()
    while any(writer.is_alive() for writer in writers) or seen[-1] < 80:
        reader = FeedbackStore.existing(path)
        ids = [c.id for c in reader.corrections()]
        assert len(set(ids)) == len(ids) and before <= set(ids)  # no row twice, none that was seen lost
        before = set(ids)
        seen.append(len(ids))
        if len(seen) > 10_000:
            break
    for writer in writers:
        writer.join(timeout=60)
    assert all(writer.exitcode == 0 for writer in writers) and seen[-1] == 80
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _finetune_on_mnist_alone(tmp_path, feedback_db):
    """finetune --no-corrections of tmp_path/base.safetensors into tmp_path/tuned, quietly, on the tiny set;
    torch's thread count put back as it was (the checkpoint's config sets one thread)."""
    import torch

    from digitrec.feedback import finetune

    threads = torch.get_num_threads()
    try:
        return finetune(
            tmp_path / "base.safetensors",
            feedback_db,  # not read without corrections
            tmp_path / "tuned",
            data=tiny_mnist(),
            corrections=False,
            report=False,
            log=lambda msg: None,
        )
    finally:
        torch.set_num_threads(threads)


def test_finetune_with_no_corrections_trains_on_mnist_alone_and_never_opens_the_store(tmp_path):
    import torch

    from digitrec.checkpoint import load_model, save_model
    from digitrec.models import create_model

    torch.manual_seed(0)
    config = {"arch": "fast_cnn", "batch_size": 64, "lr": 0.002, "device": "cpu", "threads": 1}
    base = create_model("fast_cnn").eval()
    save_model(tmp_path / "base.safetensors", base, {"recipe": "tiny", "config": config})
    run = _finetune_on_mnist_alone(
        tmp_path, tmp_path / "absent" / "db.sqlite"
    )  # its folder does not even exist
    assert not (tmp_path / "absent").exists()
    tuned, meta = load_model(run.model_path)
    assert meta["recipe"] == "tiny+finetune" and "feedback" not in meta
    assert meta["lr_scale"] == 0.1 and meta["mnist"] == {"images": 256, "checksum": "0" * 32}
    assert meta["finetuned_from"].endswith("base.safetensors")
    assert run.metrics["feedback_corrections"] == 0 and run.metrics["feedback_accuracy"] is None
    moved = [not torch.equal(a, b) for a, b in zip(base.state_dict().values(), tuned.state_dict().values())]
    assert any(moved)


def test_a_fine_tune_of_a_fine_tune_runs_at_the_scale_of_its_recipes_learning_rate(tmp_path):
    """A fine-tune's config holds its own scaled rate, and a fine-tune of it scaled that again (0.022, 0.0022,
    0.00022: the second learned nothing); the bundled model, an older fine-tune that recorded no --lr-scale,
    would have been tuned at 3e-5, not README's 3e-4."""
    import shutil

    from digitrec.checkpoint import load_model, save_model
    from digitrec.feedback import recipe_lr
    from digitrec.models import create_model
    from digitrec.predict import pretrained_path

    config = {"arch": "fast_cnn", "batch_size": 64, "lr": 0.002, "device": "cpu", "threads": 1}
    save_model(tmp_path / "base.safetensors", create_model("fast_cnn"), {"recipe": "tiny", "config": config})
    first = _finetune_on_mnist_alone(tmp_path, tmp_path / "db.sqlite")  # --lr-scale 0.1: 0.0002
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(first.model_path, again / "base.safetensors")
    shutil.copy(first.model_path.with_suffix(".json"), again / "base.json")
    second = _finetune_on_mnist_alone(again, tmp_path / "db.sqlite")
    assert first.config.lr == pytest.approx(0.0002) and second.config.lr == pytest.approx(0.0002)
    bundled = load_model(pretrained_path())[1]  # "robust+finetune", lr 3e-4, no lr_scale recorded
    assert recipe_lr(bundled, bundled["config"]["lr"]) == get_recipe("robust").lr
    assert recipe_lr({"recipe": "custom"}, 0.01) == 0.01  # no fine-tune: its own rate


def test_finetune_writes_its_metrics_while_it_still_holds_the_run_folder(tmp_path, monkeypatch):
    """finetune rewrote metrics.json after train() had let go of the folder: a second run could come in between."""
    import torch

    import digitrec.checkpoint
    from digitrec.checkpoint import save_model
    from digitrec.folderlock import RunFolderInUse, refuse_a_folder_in_use
    from digitrec.models import create_model

    torch.manual_seed(0)
    config = {"arch": "fast_cnn", "batch_size": 64, "lr": 0.002, "device": "cpu", "threads": 1}
    save_model(
        tmp_path / "base.safetensors", create_model("fast_cnn").eval(), {"recipe": "tiny", "config": config}
    )
    write = digitrec.checkpoint.atomic_write_json
    held_at_write = []

    def watching(path, payload):
        if Path(path).name == "metrics.json":
            assert "feedback_corrections" in payload
            try:
                refuse_a_folder_in_use(Path(path).parent)
                held_at_write.append(False)
            except RunFolderInUse:
                held_at_write.append(True)
        return write(path, payload)

    monkeypatch.setattr(digitrec.checkpoint, "atomic_write_json", watching)
    monkeypatch.setattr("digitrec.training.atomic_write_json", watching)
    _finetune_on_mnist_alone(tmp_path, None)
    assert held_at_write == [True]  # one metrics.json, the fine-tune's figures in it, written under the lock
    assert not (tmp_path / "tuned" / ".digitrec.lock").exists()


def test_finetune_of_an_ensemble_says_to_tune_its_members(tmp_path):
    from digitrec.checkpoint import load_ensemble, save_model
    from digitrec.feedback import finetune
    from digitrec.models import create_model

    for name in ("a", "b"):
        save_model(
            tmp_path / f"{name}.safetensors", create_model("fast_cnn"), {"config": {"arch": "fast_cnn"}}
        )
    save_model(
        tmp_path / "both.safetensors",
        *load_ensemble([tmp_path / "a.safetensors", tmp_path / "b.safetensors"]),
    )
    with pytest.raises(DigitrecError, match="is an ensemble; fine-tune each member"):
        finetune(tmp_path / "both.safetensors", tmp_path / "db.sqlite", tmp_path / "out", data=tiny_mnist())


def test_another_programs_feedback_table_or_database_is_refused_by_readers_and_the_server(tmp_path):
    """A `feedback` table of other columns gave a traceback (no such column: created_at); `serve` added its
    table to another program's database and switched it to WAL."""
    import sqlite3

    from digitrec.errors import DigitrecError
    from digitrec.feedback import FeedbackStore

    theirs = tmp_path / "theirs.db"
    with sqlite3.connect(theirs) as con:
        con.execute("CREATE TABLE feedback (id INTEGER, comment TEXT)")
    app = tmp_path / "app.db"
    with sqlite3.connect(app) as con:
        con.execute("CREATE TABLE users (name TEXT)")
    before = {path: path.read_bytes() for path in (theirs, app)}
    for path, reason in ((theirs, "without the columns"), (app, "without a feedback table")):
        for open_store in (FeedbackStore.existing, FeedbackStore):  # a reading command, then the server
            with pytest.raises(DigitrecError, match=reason):
                open_store(path)
        assert path.read_bytes() == before[path]
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()  # an empty file: the server may make it its own
    assert FeedbackStore(empty).count() == 0


@pytest.mark.parametrize("max_mb", [float("inf"), 1e12])
def test_a_limit_past_what_sqlite_can_count_stores_corrections(tmp_path, max_mb):
    """`serve --feedback-max-mb inf` (no limit) passed the command's check, then every correction was a 500:
    int(inf) raised OverflowError; SQLite counts at most 2**32 - 2 pages."""
    store = FeedbackStore(tmp_path / "feedback.sqlite", max_mb=max_mb)
    assert store.add(label=3, image=b"png", input28=np.zeros((28, 28), np.uint8)) == 1
    assert store.count() == 1


def test_serve_limits_the_feedback_database_to_the_stores_default() -> None:
    """cli.py spells the default out (importing feedback would load NumPy for every command): the two agree."""
    from digitrec.cli import build_parser

    assert build_parser().parse_args(["serve"]).feedback_max_mb == feedback.DEFAULT_MAX_MB


def test_counting_corrections_reads_an_index_not_the_images_even_in_an_older_database(tmp_path):
    """Each correction's answer counts the corrections, and COUNT(*) read every stored row's pages (images
    included): 30-40 ms a correction at 20,000 stored. A database made before the index gains it on opening."""
    path = tmp_path / "older.sqlite"
    with closing(sqlite3.connect(path)) as con:  # the schema as it was, without the index
        con.executescript(feedback.SCHEMA.split("-- COUNT(*)")[0])
    store = FeedbackStore(path)
    add(store, 3)
    assert store.count() == 1 and store.counts_by_label()[3] == 1
    with closing(sqlite3.connect(path)) as con:
        for query in ("SELECT COUNT(*) FROM feedback", "SELECT label, COUNT(*) FROM feedback GROUP BY label"):
            plan = " ".join(row[-1] for row in con.execute("EXPLAIN QUERY PLAN " + query))
            assert "COVERING INDEX feedback_label" in plan, plan


def test_one_helper_tells_a_fine_tunes_metadata():
    """The card, --resume and a new run's checks each spelled out the +feedback/+finetune test; one helper now."""
    from digitrec.feedback import finetune_base, finetune_recipe, is_finetune

    assert (
        finetune_recipe("fast", True) == "fast+feedback" and finetune_recipe("fast", False) == "fast+finetune"
    )
    assert finetune_base("robust+finetune") == "robust" and finetune_base("robust") is None
    assert is_finetune({"recipe": "fast+feedback"}) and is_finetune({"recipe": "x", "finetuned_from": "a"})
    assert is_finetune({"recipe": "x", "extra": {"finetuned_from": "a"}})
    assert not is_finetune({"recipe": "fast"}) and not is_finetune({})
