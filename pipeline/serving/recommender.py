"""Using a trained model one user at a time, without Beam: a small Python API.

    rec = Recommender.load('output')            # verified against its _SUCCESS manifest
    rec.recommend(196, k=10)                     # [(item_id, score), ...] best first
    rec.similar_items(242, k=10)                 # [(item_id, cosine), ...]
    rec.recommend_new_user([(242, 5), (302, 3)]) # fold-in of a user not in training

Scores: `wals` and `implicit` models score an item by u·v; `explicit` models report
the predicted rating μ + b_u + c_j + u·v (ranking by u·v + c_j: μ and b_u are the
same for every item). Ranking is wals_core.topk's: score descending, ties by the
smaller item row number, the user's seen items (every pair of --input, train and
hashed test, model/seen/) left out unless exclude_seen=False.

IDs: a model whose IDs were all canonical integers has int64 ID arrays; its IDs may
be given as ints or as their decimal strings ('42'). Other models have str IDs (an
int given is looked up as its decimal string). Results carry Python ints or strs.
An unknown ID raises KeyError.

Fold-in (`fold_in`): the new user's stored row from exactly one training half-step
for one row: the same RowSolver, weights, regularization, targets and item factors
as the trainer's row half-step (pipeline/training/factors.py), with the given ratings as the
row's training ratings. Repeated items are merged as the trainer merges them (mean
for ratings, sum for web_views). Items not in the model raise KeyError by default
(on_unknown='skip' drops them with a warning instead): a silently shortened history
would give a different user.
"""
from __future__ import annotations

import logging
from typing import Iterable

import numpy as np

from pipeline.store.model_files import ModelFiles, load_model_files
from wals_core import objectives
from wals_core.params import WalsParams
from wals_core.solve import gramian
from wals_core.sparse import csr_from_sorted, merge_duplicates
from wals_core.topk import similar_items as _similar_items
from wals_core.topk import top_k
from wals_core.vocab import lookup_known

log = logging.getLogger(__name__)

IdLike = int | str | np.integer


class NonFiniteScores(ValueError):
    """Scores that are not finite numbers (factors too large for float32 products):
    refused rather than ranked or printed (nan and inf are not JSON)."""


def _python(value):
    """numpy scalar -> Python int / str (results are plain Python values)."""
    return value.item() if isinstance(value, np.generic) else value


class Recommender:
    """A loaded model: recommendations, similar items, ID lookups and fold-in."""

    def __init__(self, files: ModelFiles, seen_indptr: np.ndarray, seen_indices: np.ndarray):
        self.files = files
        self.params: WalsParams = files.params
        self.users: np.ndarray = files.users
        self.items: np.ndarray = files.items
        self.row = np.ascontiguousarray(files.row, np.float32)
        self.col = np.ascontiguousarray(files.col, np.float32)
        self.explicit = objectives.has_bias(self.params)
        self.global_mean = float(files.global_mean) if self.explicit else 0.0
        self.row_bias = files.row_bias
        self.col_bias = files.col_bias
        self.seen_indptr = np.asarray(seen_indptr, np.int64)
        self.seen_indices = np.asarray(seen_indices, np.int32)
        if len(self.seen_indptr) != len(self.users) + 1:
            raise ValueError(f'seen items cover {len(self.seen_indptr) - 1} users, the model '
                             f'has {len(self.users)}')
        # The item side as the trainer's row half-step sees it: the stored matrix
        # (k factors, + the bias column for explicit) and its Gramian.
        if self.explicit:
            stored = np.concatenate([self.col, self.col_bias.reshape(-1, 1)], axis=1)
        else:
            stored = self.col
        self.col_stored = np.ascontiguousarray(stored, np.float32)
        self._gramian = gramian(self.col_stored)
        self._solve_factors, self._solve_offsets = objectives.solve_inputs(
            self.col_stored, self.params)
        data_type = files.manifest.get('parameters', {}).get('data_type', 'ratings')
        self._duplicates = 'sum' if data_type == 'web_views' else 'mean'   # as the trainer

    @classmethod
    def load(cls, path: str) -> 'Recommender':
        """The model published at `path` (local or gs://): every file checked against
        the _SUCCESS manifest (pipeline.store.publish.UntrustedModel if not), seen items
        loaded."""
        files = load_model_files(path)
        indptr, indices = files.load_seen()
        return cls(files, indptr, indices)

    # ---- IDs <-> row numbers -------------------------------------------------------

    @staticmethod
    def _index(vocab: np.ndarray, value: IdLike, side: str) -> int:
        # The trainer's own lookup of ID text: '42' and 42 are the same ID in an
        # int64 vocabulary; '042' is not (it would have made the vocabulary str).
        text = str(_python(value))
        j = int(lookup_known(vocab, np.array([text], dtype=str))[0])
        if j < 0 or isinstance(value, (bool, np.bool_)):
            raise KeyError(f'{side} ID {value!r} is not in the model ({len(vocab)} {side}s)')
        return j

    def user_index(self, user_id: IdLike) -> int:
        """Row number of a user ID (KeyError if unknown)."""
        return self._index(self.users, user_id, 'user')

    def item_index(self, item_id: IdLike) -> int:
        """Row number of an item ID (KeyError if unknown)."""
        return self._index(self.items, item_id, 'item')

    def user_id(self, index: int) -> int | str:
        return _python(self.users[self._row_number(index, len(self.users), 'user')])

    def item_id(self, index: int) -> int | str:
        return _python(self.items[self._row_number(index, len(self.items), 'item')])

    @staticmethod
    def _row_number(index: int, n: int, side: str) -> int:
        i = int(index)
        if not 0 <= i < n:
            raise IndexError(f'{side} row {index} is not in [0, {n})')
        return i

    def seen(self, user_id: IdLike) -> np.ndarray:
        """Item row numbers the user rated in --input (sorted int32)."""
        i = self.user_index(user_id)
        return self.seen_indices[self.seen_indptr[i]:self.seen_indptr[i + 1]]

    # ---- ranking -------------------------------------------------------------------

    def _rank(self, stored_row: np.ndarray, k: int, exclude: np.ndarray | None
              ) -> list[tuple[int | str, float]]:
        """Top-k items for one stored user row (k factors, + bias for explicit)."""
        kf = self.params.latent_factors
        query = np.asarray(stored_row, np.float32)[:kf].reshape(1, -1)
        excl = {}
        if exclude is not None:
            excl = dict(exclude_indptr=np.array([0, len(exclude)], np.int64),
                        exclude_indices=np.asarray(exclude))
        k = min(k, len(self.items))   # no list is longer; the kernel allocates k
        ids, scores = top_k(query, self.col, k, item_offsets=self.col_bias, num_threads=1,
                            **excl)
        shift = self.global_mean + float(stored_row[kf]) if self.explicit else 0.0
        keep = ids[0] >= 0
        out = [(_python(self.items[j]), float(s) + shift)
               for j, s in zip(ids[0][keep], scores[0][keep])]
        if not (np.all(np.isfinite(query)) and all(np.isfinite(s) for _, s in out)):
            raise NonFiniteScores('the scores are not finite numbers (the factors are too '
                                  'large for float32 products)')
        return out

    def recommend(self, user_id: IdLike, k: int = 10, exclude_seen: bool = True
                  ) -> list[tuple[int | str, float]]:
        """The k best items for a known user, best first: [(item_id, score)]."""
        i = self.user_index(user_id)
        stored = self.row[i]
        if self.explicit:
            stored = np.append(stored, np.float32(self.row_bias[i]))
        exclude = self.seen_indices[self.seen_indptr[i]:self.seen_indptr[i + 1]] \
            if exclude_seen else None
        return self._rank(stored, k, exclude)

    def similar_items(self, item_id: IdLike, k: int = 10) -> list[tuple[int | str, float]]:
        """The k items most cosine-similar to an item (never itself), best first:
        [(item_id, cosine)], on the k factors (explicit: without the bias)."""
        j = self.item_index(item_id)
        ids, sims = _similar_items(self.col, min(k, len(self.items)), query_ids=np.array([j]),
                                   num_threads=1)
        keep = ids[0] >= 0
        return [(_python(self.items[t]), float(s)) for t, s in zip(ids[0][keep], sims[0][keep])]

    # ---- fold-in -------------------------------------------------------------------

    def _rated(self, ratings: Iterable[tuple[IdLike, float]], on_unknown: str
               ) -> tuple[np.ndarray, np.ndarray]:
        """(item rows int64, values float64) of the ratings, unknown items handled."""
        if on_unknown not in ('raise', 'skip'):
            raise ValueError(f"on_unknown must be 'raise' or 'skip', got {on_unknown!r}")
        cols, values, unknown = [], [], []
        for pair in ratings:
            item, value = pair
            try:
                j = self.item_index(item)
            except KeyError:
                unknown.append(item)
                continue
            cols.append(j)
            values.append(float(value))
        if unknown:
            shown = ', '.join(repr(u) for u in unknown[:10])
            more = f' and {len(unknown) - 10} more' if len(unknown) > 10 else ''
            if on_unknown == 'raise':
                raise KeyError(f'{len(unknown)} rated item(s) are not in the model: {shown}'
                               f'{more} (on_unknown="skip" leaves them out)')
            log.warning('fold-in: %d rated item(s) are not in the model and were left out: '
                        '%s%s', len(unknown), shown, more)
        values = np.asarray(values, np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError('fold-in ratings must be finite numbers')
        return np.asarray(cols, np.int64), values

    def fold_in(self, ratings: Iterable[tuple[IdLike, float]], *, on_unknown: str = 'raise'
                ) -> np.ndarray:
        """The stored row (float32: k factors, + the user bias for explicit) of a user
        with these (item_id, rating) pairs: one training row half-step against the
        model's item factors."""
        cols, values = self._rated(ratings, on_unknown)
        return self._fold_in_rows(cols, values)

    def _fold_in_rows(self, cols: np.ndarray, values: np.ndarray) -> np.ndarray:
        rows, cols, values, _, _ = merge_duplicates(np.zeros(len(cols), np.int64), cols,
                                                    values, self._duplicates)
        csr = csr_from_sorted(rows, cols, values, 1)
        # Exact whatever the model was trained with: CG would start a new user from 0.
        solver = objectives.make_solver(csr, 'row', self.params, self.files.col_counts, 0,
                                        len(self.items), self.global_mean,
                                        num_threads=1, keep_plan=False, solver='exact')
        x = solver.solve(self._solve_factors, self._gramian,
                         other_offsets=self._solve_offsets)
        if not np.all(np.isfinite(x)):
            raise NonFiniteScores('fold-in gave non-finite factors (check the ratings)')
        return x[0].astype(np.float32)

    def recommend_new_user(self, ratings: Iterable[tuple[IdLike, float]], k: int = 10,
                           exclude_rated: bool = True, *, on_unknown: str = 'raise'
                           ) -> list[tuple[int | str, float]]:
        """Recommendations for a user not in training, from their ratings (fold_in),
        the rated items left out unless exclude_rated=False."""
        cols, values = self._rated(ratings, on_unknown)
        stored = self._fold_in_rows(cols, values)
        return self._rank(stored, k, np.unique(cols) if exclude_rated else None)
