"""The shortcuts of GET /recommend and GET /recommendation (pipeline/serving/app.py:
plain queries answered in front of FastAPI) against the routes themselves: for any
query string, the app with the shortcuts and the same app without them give the same
status, body bytes and version header.

Both apps run in process over one loaded model (httpx's ASGI transport: the full ASGI
stack, no socket); tests/test_serve.py drives the real server, shortcut included."""
from __future__ import annotations

import asyncio
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.serving.app import (Limits, create_app, plain_compat_query,
                                  plain_recommend_query)
from pipeline.serving.model_holder import ModelHolder
from tests.serve_support import int_id_ratings, str_id_ratings, train

LIMITS = Limits(max_k=50, max_id_length=24)


@pytest.fixture(scope='module', params=['wals', 'explicit'])
def apps(request, tmp_path_factory):
    """(app with the shortcut, app without it, some user IDs of the model)."""
    base = tmp_path_factory.mktemp(f'shortcut-{request.param}')
    if request.param == 'wals':
        data = int_id_ratings(base / 'ratings.tsv')
        model = train(data, base / 'model', '--latent_factors', '3')
    else:
        data = str_id_ratings(base / 'ratings.tsv')
        model = train(data, base / 'model', '--model', 'explicit', '--latent_factors', '3')
    holder = ModelHolder(model=str(model))
    holder.load_fixed()
    with_shortcut, without = create_app(holder, LIMITS), create_app(holder, LIMITS)
    without.guard.shortcuts.clear()
    users = [str(u) for u in holder.current.rec.users[:40]]
    return with_shortcut, without, users


def _ask(app, queries: list[str], path: str = '/recommend') -> list[tuple]:
    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url='http://test') as c:
            out = []
            for q in queries:
                r = await c.get(path + ('?' + q if q else ''))
                out.append((r.status_code, r.content, r.headers.get('x-model-version')))
            return out
    return asyncio.run(run())


def _same_answers(apps, queries: list[str], path: str = '/recommend') -> int:
    """Asserts equal answers; returns how many the shortcut gave."""
    with_shortcut, without, _ = apps
    before = with_shortcut.guard.shortcut_answers
    fast, slow = _ask(with_shortcut, queries, path), _ask(without, queries, path)
    for q, a, b in zip(queries, fast, slow):
        assert a == b, q
    assert without.guard.shortcut_answers == 0
    return with_shortcut.guard.shortcut_answers - before


def test_plain_queries_take_the_shortcut_and_answer_as_the_route(apps):
    users = apps[2]
    plain = [f'user={quote(u)}' for u in users[:10]] + \
            [f'user={quote(users[0])}&k={k}' for k in (1, 7, 50)] + \
            [f'k=3&exclude_seen={b}&user={quote(users[1])}' for b in ('true', 'false', '1', '0')]
    assert _same_answers(apps, plain) == len(plain)


def test_everything_else_is_left_to_the_route(apps):
    u = quote(apps[2][0])
    other = ['', 'k=5', f'user={u}&k=0', f'user={u}&k=51', f'user={u}&k=07', f'user={u}&k=+5',
             f'user={u}&k=5.0', f'user={u}&k=%205', f'user={u}&user={u}', f'user={u}&k=3&k=4',
             f'user={u}&exclude_seen=yes', f'user={u}&exclude_seen=TRUE', f'user={u}&exclude_seen=',
             f'user={u}&allow={u}', f'user={u}&block=1', f'user={u}&other=1', 'user=',
             'user=' + 'x' * 25, 'user=%00', 'user=a%0Ab', 'user=%FF%FE', 'user=no-such-user',
             f'user={u}&k=99999999999999999999']
    assert _same_answers(apps, other) == 0
    assert {status for status, _, _ in _ask(apps[0], other)} >= {200, 404, 422}


K_SPELLINGS = ['', '0', '1', '01', '5', '50', '51', '+5', '-5', '5.0', '1_0', ' 5', '5 ', '٥',
               '99999999999']
FLAG_SPELLINGS = ['', 'true', 'false', '1', '0', 'yes', 'no', 'on', 'off', 't', 'f', 'y', 'n',
                  'TRUE', 'True', 'False', ' 1', '1 ', '2']


def test_every_spelling_of_k_and_exclude_seen_answers_as_the_route(apps):
    u = quote(apps[2][2])
    queries = [f'user={u}&k={quote(k)}&exclude_seen={quote(b)}'
               for k in K_SPELLINGS for b in FLAG_SPELLINGS]
    taken = _same_answers(apps, queries)
    assert taken == len(['x' for k in K_SPELLINGS if k in ('1', '5', '50')
                         for b in FLAG_SPELLINGS if b in ('true', 'false', '1', '0')])


_TEXT = st.text(max_size=30)
_K = st.one_of(st.sampled_from(K_SPELLINGS), _TEXT)
_BOOL = st.one_of(st.sampled_from(FLAG_SPELLINGS), _TEXT)
_OTHER = st.tuples(st.sampled_from(['allow', 'block', 'kk', '', 'user']),
                   st.one_of(st.sampled_from(['%00', '%FF', '+', '%20', 'a b']), _TEXT))


def _draw_query(data, users: list[str], user_name: str, optional: list[tuple], other) -> str:
    """A query string: maybe a real user, maybe each of `optional` (name, value
    strategy), maybe a few `other` (name, value) pairs, in any order."""
    params = [(user_name, data.draw(st.sampled_from(users)))] if data.draw(st.booleans()) \
        else []
    for name, values in optional:
        if data.draw(st.booleans()):
            params.append((name, data.draw(values)))
    params += data.draw(st.lists(other, max_size=2 if data.draw(st.booleans()) else 0))
    params = data.draw(st.permutations(params))
    # Some values with '%', '+', '&' and '=' left as they are: the parser's own reading.
    safe = data.draw(st.sampled_from(['', '%+&=']))
    return '&'.join(f'{n}={quote(v, safe=safe)}' for n, v in params)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_query_gets_the_same_answer_with_and_without_the_shortcut(apps, data):
    query = _draw_query(data, apps[2], 'user', [('k', _K), ('exclude_seen', _BOOL)], _OTHER)
    _same_answers(apps, [query])


def test_compatibility_route_plain_queries_take_the_shortcut(apps):
    users = apps[2]
    plain = [f'userId={quote(u)}' for u in users[:10]] + \
            [f'numRecs={k}&userId={quote(users[3])}' for k in (1, 5, 50)]
    assert _same_answers(apps, plain, '/recommendation') == len(plain)


def test_compatibility_route_leaves_everything_else_to_the_route(apps):
    u = quote(apps[2][0])
    other = ['', 'numRecs=5', 'userId=', 'userId=%00', 'userId=' + 'x' * 25,
             'userId=no-such-user', f'userId={u}&userId={u}', f'userId={u}&user={u}'] + \
            [f'userId={u}&numRecs={quote(k)}' for k in K_SPELLINGS if k not in ('1', '5', '50')]
    assert _same_answers(apps, other, '/recommendation') == 0
    assert {s for s, _, _ in _ask(apps[0], other, '/recommendation')} >= {200, 400, 404, 422}


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_compatibility_query_gets_the_same_answer(apps, data):
    other = st.tuples(st.sampled_from(['userId', 'numRecs', 'user', '']), _TEXT)
    query = _draw_query(data, apps[2], 'userId', [('numRecs', _K)], other)
    _same_answers(apps, [query], '/recommendation')


def test_the_parse_is_starlettes():
    assert plain_recommend_query(b'user=a+b&k=2', LIMITS) == ('a b', 2, True)
    assert plain_recommend_query(b'user=%C3%A9&exclude_seen=0', LIMITS) == ('\xe9', 10, False)
    assert plain_recommend_query(b'k=2', LIMITS) is None
    assert plain_recommend_query(b'user=a&k=51', LIMITS) is None
    assert plain_compat_query(b'userId=a+b', LIMITS) == ('a b', LIMITS.compat_default_k)
    assert plain_compat_query(b'userId=a&numRecs=+3', LIMITS) is None


def test_a_failure_inside_the_shortcut_is_answered_by_the_route(apps, monkeypatch):
    """The shortcut runs in front of FastAPI's error handling: whatever it raises, the
    route answers instead (here the same failure: a JSON 500, not uvicorn's text)."""
    with_shortcut, without, users = apps
    rec = with_shortcut.state.holder.current.rec

    def broken(user):
        raise RuntimeError('disk on fire')
    monkeypatch.setattr(rec, 'user_index', broken)

    async def ask(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url='http://test') as c:
            r = await c.get('/recommend', params={'user': users[0]})
            return r.status_code, r.json()
    assert asyncio.run(ask(with_shortcut)) == asyncio.run(ask(without)) == \
        (500, {'detail': 'internal error (logged)'})
