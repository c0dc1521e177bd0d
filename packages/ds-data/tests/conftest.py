import json
import os

import pytest

import ds_data
import ds_data.synthetic


@pytest.fixture(scope="session")
def builtin_corpus():
    return ds_data.load_corpus("builtin")


@pytest.fixture(scope="session")
def small_tokenizer(builtin_corpus, tmp_path_factory):
    return ds_data.train_tokenizer(builtin_corpus, 600, str(tmp_path_factory.mktemp("tok")))


FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.fixture(scope="session")
def fixtures_dir():
    return FIXTURES


@pytest.fixture(scope="session")
def expected_problems():
    with open(os.path.join(FIXTURES, "expected.json")) as f:
        return json.load(f)


@pytest.fixture
def sample_records():
    return list(ds_data.synthetic.sample_records(48, seed=7))


@pytest.fixture
def run_cli(capsys):
    """Run the ds-data CLI in-process; returns (exit code, stdout, stderr)."""
    from ds_data.cli import main

    def run(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run
