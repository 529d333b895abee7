"""The baseline of bench/bench_serve.py: what the original solution's App Engine app did
per request, as a Flask app run the way it was deployed (gunicorn, sync workers).

Re-implemented from the original's logic (GoogleCloudPlatform/tensorflow-recommendation-
wals, app/main.py and app/recommendations.py), not copied: the model's row.npy, col.npy,
user.npy and item.npy loaded once with np.load; the seen items as a pandas groupby of the
(user ID, item ID) pairs (the original read them from its events CSV); per request the
user's row by np.searchsorted, their items by get_group and one searchsorted each,
col.dot(user) and a full np.argsort, the k + len(seen) best kept and the seen ones
removed by a list scan. Route and answer as the original: GET /recommendation?userId=
&numRecs= -> {"articles": [...]}, and GET /readiness_check.

    BASELINE_MODEL=output/bench-serve/model-10m gunicorn -b 127.0.0.1:8081 \\
        --chdir bench serve_baseline:app

Flask and gunicorn come from bench/requirements.txt (never project dependencies).
"""
from __future__ import annotations

import os
import pathlib

import numpy as np
import pandas as pd
from flask import Flask, jsonify, request

DEFAULT_RECS = 5


def _seen_pairs(model: pathlib.Path, users: np.ndarray, items: np.ndarray) -> pd.DataFrame:
    """(userId, itemId) of every seen pair, from the model's seen/part-*.npz (CSR blocks
    by user row)."""
    frames = []
    for part in sorted((model / 'model' / 'seen').glob('part-*.npz')):
        with np.load(part, allow_pickle=False) as z:
            start, indptr, indices = int(z['start']), z['indptr'], z['indices']
        rows = start + np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        frames.append(pd.DataFrame({'userId': users[rows], 'itemId': items[indices]}))
    return pd.concat(frames, ignore_index=True)


class Recommendations:
    def __init__(self, model: pathlib.Path):
        load = lambda name: np.load(model / 'model' / f'{name}.npy')  # noqa: E731
        self.user_factor, self.item_factor = load('row'), load('col')
        self.user_map, self.item_map = load('user'), load('item')
        self.user_items = _seen_pairs(model, self.user_map, self.item_map).groupby('userId')

    def get_recommendations(self, user_id: int, num_recs: int):
        article_recommendations = None
        user_idx = np.searchsorted(self.user_map, user_id)
        if user_idx:
            already_rated = self.user_items.get_group(user_id).itemId
            already_rated_idx = [np.searchsorted(self.item_map, i) for i in already_rated]
            recommendations = generate_recommendations(user_idx, already_rated_idx,
                                                       self.user_factor, self.item_factor,
                                                       num_recs)
            article_recommendations = [self.item_map[i] for i in recommendations]
        return article_recommendations


def generate_recommendations(user_idx, user_rated, row_factor, col_factor, k):
    assert (row_factor.shape[0] - len(user_rated)) >= k
    user_f = row_factor[user_idx]
    pred_ratings = col_factor.dot(user_f)
    k_r = k + len(user_rated)
    candidate_items = np.argsort(pred_ratings)[-k_r:]
    recommended_items = [i for i in candidate_items if i not in user_rated]
    recommended_items = recommended_items[-k:]
    recommended_items.reverse()
    return recommended_items


app = Flask(__name__)
rec_util = Recommendations(pathlib.Path(os.environ['BASELINE_MODEL']))


@app.route('/recommendation', methods=['GET'])
def recommendation():
    user_id = request.args.get('userId')
    num_recs = request.args.get('numRecs')
    if user_id is None:
        return 'No User Id provided.', 400
    if num_recs is None:
        num_recs = DEFAULT_RECS
    try:
        uid_int = int(user_id)
        nrecs_int = int(num_recs)
    except ValueError:
        return 'User id and number of recs arguments must be integers.', 400
    rec_list = rec_util.get_recommendations(uid_int, nrecs_int)
    if rec_list is None:
        return f'User Id not found : {user_id}', 400
    return jsonify({'articles': [str(i) for i in rec_list]}), 200


@app.route('/readiness_check', methods=['GET'])
def readiness_check():
    return '', 200
