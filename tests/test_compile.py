"""``model.compile_layers``: the decoder layers compiled regionally give the eager log-probs and gradients, on
padded and packed batches. Compilation takes a minute on 2 CPU cores: ``slow``."""

import pytest

from prefmodule import ORPOModule

from conftest import TINY_MODEL
from test_logps import a_batch, packed, relative_error, stats_and_grads

pytestmark = pytest.mark.slow


def test_compiled_layers_give_the_eager_log_probs_and_gradients(demo_rows):
    eager, compiled = (ORPOModule(model=TINY_MODEL, compile_layers=flag) for flag in (False, True))
    for module in (eager, compiled):
        module.configure_model()
    layers = compiled.policy.model.layers
    assert len(layers) == 2 and all(layer._compiled_call_impl is not None for layer in layers)  # compiled in place
    assert compiled.packed_attention and eager.packed_attention
    padded = a_batch(eager, demo_rows[:4])
    for batch in (padded, packed(padded)):
        expected, expected_grads = stats_and_grads(eager, batch)
        actual, actual_grads = stats_and_grads(compiled, batch)
        assert relative_error(actual.logps, expected.logps) < 1e-5
        for name, grad in expected_grads.items():
            assert relative_error(actual_grads[name], grad) < 1e-4, name
