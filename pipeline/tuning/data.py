"""The tuner's data: the trainer's input read through Beam, split into the
trials' training pairs and a validation split, gathered on one worker.

Pairs are split exactly as the trainer splits them (wals_core.hashing.is_test with
--split_seed and --test_fraction); the test pairs are dropped here and never reach a
trial. A second stable hash, with a seed derived from --split_seed, carves the
validation pairs out of the training pairs. Every trial trains on the rest.
"""
from __future__ import annotations

import dataclasses
import io

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import AsSingleton

from pipeline.io.parse import ParsedChunk
from pipeline.io.read import ReadConfig
from pipeline.io.read_summary import ReadAndCheck   # the trainer's reading and check
from pipeline.io.vocabulary import DistinctIds
from pipeline.options import DEFAULT_MAX_ABS_VALUE, DEFAULT_MAX_LINE_BYTES
from wals_core.hashing import id_hashes, is_test, mix64
from wals_core.sparse import merge_duplicates
from wals_core.vocab import finalize_ids, lookup

# Salts that derive the validation and user-sample seeds from --split_seed, so that
# neither hash repeats the train/test split's.
_VALIDATION_SALT = 0x56414C4944   # "VALID"
_SAMPLE_SALT = 0x53414D504C45     # "SAMPLE"


def derived_seed(split_seed: int, salt: int) -> int:
    """A seed for another stable hash of the same pairs, fixed by split_seed."""
    return int(mix64(np.uint64((split_seed ^ salt) & 0xFFFFFFFFFFFFFFFF)))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    input: str
    delimiter: str
    headers: bool
    data_type: str
    max_bad_fraction: float
    test_fraction: float
    split_seed: int
    validation_fraction: float = 0.1
    sample_users: int | None = None   # keep only this many users (hash-chosen)
    max_id_length: int | None = None
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    max_abs_value: float = DEFAULT_MAX_ABS_VALUE


@dataclasses.dataclass
class TuneData:
    """Everything a trial needs, with indices into the vocabularies.

    The vocabularies hold every (sampled) user and item of the input, as in the
    trainer, so initial factors match the trainer's. train_*: the trial training
    pairs (training split minus validation); val_*: the validation pairs whose user
    and item both have trial training ratings (warm, as the trainer's test RMSE).
    """
    user_ids: np.ndarray
    item_ids: np.ndarray
    user_hashes: np.ndarray     # uint64, wals_core.hashing.id_hashes of the IDs
    item_hashes: np.ndarray
    train_rows: np.ndarray      # int32
    train_cols: np.ndarray      # int32
    train_values: np.ndarray    # float64
    val_rows: np.ndarray
    val_cols: np.ndarray
    val_values: np.ndarray
    test_pairs: int = 0         # held out for the trainer's test split, unused here
    val_cold_pairs: int = 0     # validation pairs left out: user or item not in training
    input_users: int = 0        # users in the input before --sample_users
    duplicates_merged: int = 0

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def describe(self) -> dict:
        return {'users': self.num_users, 'items': self.num_items,
                'input_users': self.input_users,
                'train_ratings': len(self.train_values),
                'validation_ratings': len(self.val_values),
                'validation_cold_start_ratings': self.val_cold_pairs,
                'test_ratings_unused': self.test_pairs,
                'duplicates_merged': self.duplicates_merged}


_FIELDS = [f.name for f in dataclasses.fields(TuneData)]


def save_data(path: str, data: TuneData) -> None:
    """np.savez (no pickle) through Beam's FileSystems, so gs:// works."""
    buf = io.BytesIO()
    np.savez(buf, **{name: np.asarray(getattr(data, name)) for name in _FIELDS})
    with FileSystems.create(path) as f:
        f.write(buf.getvalue())


def load_data(path: str) -> TuneData:
    with FileSystems.open(path) as f:
        npz = np.load(io.BytesIO(f.read()), allow_pickle=False)
        fields = {name: npz[name] for name in _FIELDS}
    for name in ('test_pairs', 'val_cold_pairs', 'input_users', 'duplicates_merged'):
        fields[name] = int(fields[name])
    return TuneData(**fields)


def sample_users(user_ids: np.ndarray, n: int, split_seed: int) -> np.ndarray:
    """The n users (str IDs, sorted) with the smallest salted hash of their ID: the
    same users on any runner and for any file order; all of them when n >= len."""
    vocab = finalize_ids(np.asarray(user_ids, dtype=str))
    key = mix64(id_hashes(vocab.tolist()) ^ np.uint64(derived_seed(split_seed, _SAMPLE_SALT)))
    chosen = np.sort(np.argsort(key, kind='stable')[:n])
    return vocab[chosen].astype(str)


@dataclasses.dataclass
class Piece:
    """One chunk's kept ratings, IDs factorized (a ParsedChunk without its lines)."""
    user_codes: np.ndarray
    user_ids: np.ndarray
    item_codes: np.ndarray
    item_ids: np.ndarray
    values: np.ndarray


def to_piece(chunk: ParsedChunk, kept_users: np.ndarray | None = None) -> Piece:
    """The chunk's ratings, only those of kept_users (str IDs) if given."""
    user_codes, item_codes, values = chunk.user_codes, chunk.item_codes, chunk.values
    user_ids, item_ids = chunk.user_ids, chunk.item_ids
    if kept_users is not None:
        keep = np.isin(user_ids, kept_users)[user_codes]
        user_codes, item_codes, values = user_codes[keep], item_codes[keep], values[keep]
        # Only the IDs still rated, so that every ID of a piece is in the vocabulary.
        used, user_codes = np.unique(user_codes, return_inverse=True)
        user_ids, user_codes = user_ids[used], user_codes.astype(np.int32).reshape(-1)
        used, item_codes = np.unique(item_codes, return_inverse=True)
        item_ids, item_codes = item_ids[used], item_codes.astype(np.int32).reshape(-1)
    return Piece(user_codes, user_ids, item_codes, item_ids, values)


def assemble(pieces: list[Piece], config: DataConfig, input_users: int = 0) -> TuneData:
    """TuneData from every piece (any order: the result is the same)."""
    def ids_of(field: str) -> np.ndarray:
        parts = [getattr(p, field) for p in pieces if len(p.values)]
        return finalize_ids(np.concatenate(parts) if parts else np.array([], dtype=str))

    users, items = ids_of('user_ids'), ids_of('item_ids')
    rows = [lookup(users, p.user_ids)[p.user_codes] for p in pieces if len(p.values)]
    cols = [lookup(items, p.item_ids)[p.item_codes] for p in pieces if len(p.values)]
    vals = [p.values for p in pieces if len(p.values)]
    if not vals:
        raise ValueError('no ratings to tune on')
    how = 'sum' if config.data_type == 'web_views' else 'mean'   # as the trainer merges
    r, c, v, _, merged = merge_duplicates(np.concatenate(rows), np.concatenate(cols),
                                          np.concatenate(vals), how)
    uh, ih = id_hashes(users.tolist()), id_hashes(items.tolist())
    test = is_test(uh[r], ih[c], config.split_seed, config.test_fraction)
    val = ~test & is_test(uh[r], ih[c], derived_seed(config.split_seed, _VALIDATION_SALT),
                          config.validation_fraction)
    train = ~test & ~val
    has_user = np.bincount(r[train], minlength=len(users)) > 0
    has_item = np.bincount(c[train], minlength=len(items)) > 0
    warm = val & has_user[r] & has_item[c]
    return TuneData(
        user_ids=users, item_ids=items, user_hashes=uh, item_hashes=ih,
        train_rows=r[train].astype(np.int32), train_cols=c[train].astype(np.int32),
        train_values=v[train], val_rows=r[warm].astype(np.int32),
        val_cols=c[warm].astype(np.int32), val_values=v[warm],
        test_pairs=int(test.sum()), val_cold_pairs=int((val & ~warm).sum()),
        input_users=input_users or len(users), duplicates_merged=merged)


def _assemble(pieces: list[Piece], config: DataConfig, input_users, checked_reads) -> TuneData:
    # checked_reads is unused: the side input makes assembly wait for check_reads.
    return assemble(pieces, config, int(input_users))


def _save(data: TuneData, path: str) -> str:
    save_data(path, data)
    return path


class PrepareTuning(beam.PTransform):
    """PBegin -> singleton path of the saved TuneData (at `path`).

    Reads the input as the trainer does (ReadRatings, the same bad-line check),
    keeps --sample_users users if asked (chosen before the ratings are gathered,
    so the rest never travels), and gathers the ratings on one worker to split them.
    """

    def __init__(self, config: DataConfig, path: str):
        super().__init__()
        self._config = config
        self._path = path

    def expand(self, pbegin):
        cfg = self._config
        chunks, reads, _ = pbegin | 'Read' >> ReadAndCheck(
            ReadConfig(cfg.input, cfg.delimiter, cfg.headers, cfg.data_type,
                       max_id_length=cfg.max_id_length, max_line_bytes=cfg.max_line_bytes,
                       max_abs_value=cfg.max_abs_value),
            cfg.max_bad_fraction)
        if cfg.sample_users:
            distinct = chunks | 'Users' >> beam.CombineGlobally(DistinctIds('user_ids'))
            kept = distinct | 'Sample' >> beam.Map(sample_users, cfg.sample_users,
                                                   cfg.split_seed)
            input_users = distinct | 'CountUsers' >> beam.Map(len)
            pieces = chunks | 'Pieces' >> beam.Map(to_piece, AsSingleton(kept))
        else:
            input_users = pbegin | 'NoCount' >> beam.Create([0])
            pieces = chunks | 'Pieces' >> beam.Map(to_piece)
        return (pieces
                | 'Gather' >> beam.combiners.ToList()
                | 'Assemble' >> beam.Map(_assemble, cfg, AsSingleton(input_users),
                                         AsSingleton(reads))
                | 'Save' >> beam.Map(_save, self._path))
