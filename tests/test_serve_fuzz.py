"""Fuzzing every route of the server from its own OpenAPI document (Schemathesis): the
real server process, requests generated from /openapi.json (valid ones, and invalid
ones that the schema forbids). No answer may be a 5xx, every status and content type
must be documented, every body must match its schema, and invalid input must be
refused with a 4xx."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (content_type_conformance, negative_data_rejection,
                                 not_a_server_error, response_schema_conformance,
                                 status_code_conformance)

from pipeline.serving.recommender import Recommender
from tests.serve_support import int_id_ratings, running, train

KEY = 'fuzz-key-0123456789abcdef'
EXAMPLES = 40     # per operation and mode
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection]


@pytest.fixture(scope='module')
def fuzz_server(tmp_path_factory):
    base = tmp_path_factory.mktemp('fuzz')
    model = train(int_id_ratings(base / 'ratings.tsv'), base / 'model', '--latent_factors', '3')
    # Small limits: generated lists and bodies stay small, and the limits get hit.
    with running(['--model', model, '--max_k', '40', '--max_batch', '8', '--max_list', '8',
                  '--max_id_length', '24'], base / 'server.log',
                 {'WALS_SERVE_API_KEY': KEY}) as server:
        server.model = model
        yield server
    assert 'Traceback' not in server.log(), server.log()[-3000:]


def _with_real_ids(node, ids: list[str]):
    """The document with every ID schema (a string with the ID pattern, or the
    compatibility route's userId) narrowed to an enum of real user and item IDs and
    a few unknown ones, for the valid requests: random strings would almost never
    name a user or an item, and answers with items would go unchecked. (A union of
    the enum and the original schema does not work: the generator merges it back
    into the original.) The invalid requests are drawn from the document as served."""
    if isinstance(node, list):
        return [_with_real_ids(x, ids) for x in node]
    if not isinstance(node, dict):
        return node
    if node.get('name') == 'userId' and 'schema' in node:
        return dict(node, schema={'enum': ids})
    if node.get('type') == 'string' and 'pattern' in node:
        return {'enum': ids}
    return {k: _with_real_ids(v, ids) for k, v in node.items()}


@pytest.fixture(scope='module')
def api_schema(fuzz_server):
    import httpx
    document = httpx.get(f'{fuzz_server.url}/openapi.json', headers={'X-API-Key': KEY},
                         timeout=60).json()
    rec = Recommender.load(str(fuzz_server.model))
    ids = sorted({str(rec.user_id(i)) for i in range(0, len(rec.users), 10)} |
                 {str(rec.item_id(j)) for j in range(0, len(rec.items), 6)}) + ['0', 'nope']
    config = schemathesis.Config()
    config.projects.default.update(base_url=fuzz_server.url)
    return {GenerationMode.POSITIVE: schemathesis.openapi.from_dict(
                _with_real_ids(document, ids), config=config),
            GenerationMode.NEGATIVE: schemathesis.openapi.from_dict(document, config=config)}


# Every operation of the document (the first test checks that none is missing). The
# cases are drawn with Hypothesis directly: Schemathesis's pytest plugin does not run
# under this pytest (9.x) yet.
WITH_INPUT = ['GET /recommend', 'POST /recommend', 'GET /similar', 'POST /fold_in',
              'GET /recommendation']
OPERATIONS = WITH_INPUT + ['GET /model', 'GET /healthz', 'GET /readyz', 'GET /metrics',
                           'GET /readiness_check']
CASES = [(label, GenerationMode.POSITIVE) for label in OPERATIONS] + \
        [(label, GenerationMode.NEGATIVE) for label in WITH_INPUT]


def test_the_document_lists_every_operation(api_schema):
    found = set()
    for result in api_schema[GenerationMode.NEGATIVE].get_all_operations():
        found.add(result.ok().label)
    assert found == set(OPERATIONS)


@pytest.mark.parametrize('label, mode', CASES,
                         ids=[f'{"valid" if m is GenerationMode.POSITIVE else "invalid"} {label}'
                              for label, m in CASES])
def test_every_route_answers_within_its_schema_and_never_5xx(api_schema, label, mode):
    operation = api_schema[mode].find_operation_by_label(label)

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        case.call_and_validate(headers={'X-API-Key': KEY}, checks=CHECKS, timeout=60)
    check()

