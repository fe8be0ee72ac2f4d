"""The method registry: built-in and user methods, their declared options and needs."""

import inspect
import typing

import numpy as np
import pytest

import livar_merge.aggregation as aggregation
from livar_merge.aggregation import (
    available_methods,
    make_aggregator,
    method_spec,
    register_method,
    unregister_method,
)
from livar_merge.aggregation.registry import keyword_parameters
from livar_merge.errors import MethodOptionError, RegistrationError, UnknownMethodError
from livar_merge.federated.config import FedConfig, resolve_config
from tests.helpers import make_updates


def test_registry_and_needs():
    assert {"fedavg", "livar", "livar-alpha", "livar-sigma"} <= set(available_methods())
    assert make_aggregator("fedavg").needs == frozenset()
    assert make_aggregator("livar").needs == {"omega", "sigma"}
    assert make_aggregator("livar-alpha").needs == {"omega"}
    assert make_aggregator("livar-sigma").needs == {"sigma"}
    assert make_aggregator("livar").describe()["table"]["name"] == "paper-table-a"
    with pytest.raises(
        UnknownMethodError, match="unknown aggregation method 'fedmagic'; available"
    ):
        make_aggregator("fedmagic")


# ------------------------------------------------------------------------------ the registry
def factory_parameters(spec):
    """Keyword parameters of a built-in factory and their defaults; a factory forwarding
    ``**options`` forwards them to the class it returns (CCVR's ``ccvr_*`` options)."""
    factory = spec.load()
    params = keyword_parameters(factory)
    if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values()):
        returned = typing.get_type_hints(factory)["return"]
        params |= {k: v for k, v in keyword_parameters(returned).items() if k not in ("name",)}
    return {k: v for k, v in params.items() if k != "base"}


@pytest.mark.parametrize("name", available_methods())
def test_builtin_options_are_fedconfig_fields_with_its_defaults(name):
    spec = method_spec(name)
    params = factory_parameters(spec)
    assert set(spec.options) == set(params), name
    defaults = FedConfig()
    for option in spec.options:
        assert params[option] == getattr(defaults, option), (name, option)
    aggregator = make_aggregator(name)
    assert aggregator.needs == spec.needs and aggregator.describe()["method"] == name
    assert spec.uses_table == (name in ("livar", "livar-alpha", "livar+ccvr"))


def test_make_aggregator_refuses_options_a_method_does_not_take():
    with pytest.raises(MethodOptionError) as err:
        make_aggregator("fisher", lora_merge="svd", ccvr_lr=0.1)
    message = str(err.value)
    assert "'fisher'" in message and "ccvr_lr, lora_merge" in message
    assert "it takes: fisher_floor" in message
    with pytest.raises(UnknownMethodError, match="unknown aggregation method 'fedmagic'"):
        make_aggregator("fedmagic")


@pytest.fixture
def user_method():
    from livar_merge.aggregation.weighted import WeightedAggregator

    @register_method("test-half", needs={"sigma"})
    def half(*, lora_merge="product", proto_weight=1.0):
        """FedAvg LoRA, variance head (a user method for the tests)."""
        aggregator = WeightedAggregator("test-half", "samples", "variance", lora_merge=lora_merge)
        aggregator.weight = proto_weight
        return aggregator

    yield half
    unregister_method("test-half")


def test_a_user_method_runs_end_to_end_with_its_declared_options(user_method):
    spec = method_spec("test-half")
    assert spec.options == ("lora_merge", "proto_weight") and spec.needs == {"sigma"}
    assert spec.description.startswith("FedAvg LoRA") and not spec.uses_table
    config = resolve_config("tiny", None, {"method": "test-half", "proto_weight": 0.5})
    assert config.method_options() == {"lora_merge": "product", "proto_weight": 0.5}
    aggregator = make_aggregator(config.method, **config.method_options())
    assert aggregator.weight == 0.5
    reference = make_aggregator("livar-sigma")
    updates = make_updates()
    np.testing.assert_array_equal(
        aggregator.aggregate(updates).head.weight, reference.aggregate(updates).head.weight
    )
    with pytest.raises(MethodOptionError, match="'test-half' does not take option"):
        make_aggregator("test-half", table="paper-table-a")
    with pytest.raises(RegistrationError, match="registered twice"):
        register_method("test-half")(user_method)


def test_registrations_are_checked():
    def factory(*, lora_merge="product"):
        raise AssertionError("never built")

    with pytest.raises(RegistrationError, match="does not take"):
        register_method("test-bad", options=("fisher_floor",))(factory)
    with pytest.raises(RegistrationError, match="known needs"):
        register_method("test-bad", needs={"hessian"})(factory)
    assert "test-bad" not in available_methods()


def test_package_names_resolve_and_all_lists_them():
    assert aggregation.__all__ == sorted(aggregation.__all__, key=lambda n: (n != n.upper(), n))
    for name in aggregation.__all__:
        assert getattr(aggregation, name) is not None, name
    assert set(aggregation.__all__) >= set(aggregation._LAZY)


def test_the_needs_vocabulary_is_the_one_home_of_statistic_names():
    """Every need's fields have distinct extras keys and wire names; passive needs are those a
    paired method may use; a method needing an unknown statistic is refused by name."""
    from livar_merge.aggregation.needs import EXTRA_FIELDS, NEEDS, PASSIVE_NEEDS, wire_field
    from livar_merge.aggregation.registry import MethodSpec
    from livar_merge.errors import RegistrationError

    assert set(NEEDS) == {"omega", "sigma", "gram", "fisher", "prototypes", "moments"}
    assert {"omega", "sigma", "gram", "fisher"} == PASSIVE_NEEDS
    fields = [f for need in NEEDS.values() for f in need.fields]
    assert len({f.extra for f in fields}) == len({f.wire for f in fields}) == len(fields)
    assert set(EXTRA_FIELDS) == {"gram", "head_gram", "fisher", "proto_mean", "proto_count"}
    assert wire_field("gram/blocks.0.attn.qkv") is EXTRA_FIELDS["gram"]
    assert wire_field("fisher/head.weight") is EXTRA_FIELDS["fisher"]
    assert wire_field("head-gram") is EXTRA_FIELDS["head_gram"]
    for not_a_statistic in ("lora/blocks.0.attn.qkv.lora_A.weight", "head/weight", "gram", "x"):
        assert wire_field(not_a_statistic) is None
    with pytest.raises(RegistrationError, match=r"method 'newton' needs \['hessian'\]; known"):
        MethodSpec("newton", "x:y", needs=frozenset({"omega", "hessian"}))


def test_aggregate_hands_merge_one_context():
    """A method implements merge(updates, ctx): aggregate validates, then passes the previous
    head, scaling and rank (None unless given) as one MergeContext."""
    import torch

    from livar_merge.aggregation import Aggregator, ClientUpdate, MergeContext

    seen: list[MergeContext] = []

    class Recorder(Aggregator):
        name = "recorder"

        def merge(self, updates, ctx):
            seen.append(ctx)
            return "merged"

    update = ClientUpdate(
        client_id="client_0",
        num_samples=3,
        lora={"l.lora_A.weight": torch.ones(1, 2), "l.lora_B.weight": torch.ones(2, 1)},
        head_weight=torch.zeros(4, 2),
        head_bias=torch.zeros(4),
    )
    head = (torch.ones(4, 2), None)
    assert Recorder().aggregate([update], previous_head=head, scaling={"l": 2.0}) == "merged"
    assert Recorder().aggregate([update], rank=8) == "merged"
    assert seen[0] == MergeContext(previous_head=head, scaling={"l": 2.0}, rank=None)
    assert seen[1] == MergeContext(previous_head=None, scaling=1.0, rank=8)


def test_each_method_declares_its_options_once():
    """The built-ins' own options are the fields of their dataclass: the registry lists them,
    FedConfig is composed of them and the factories' defaults are theirs."""
    import dataclasses
    import inspect

    from livar_merge.aggregation.options import (
        CCVROptions,
        FedProtoOptions,
        FisherOptions,
        RegMeanOptions,
    )
    from livar_merge.aggregation.registry import method_spec
    from livar_merge.federated.config import FedConfig

    declared = {
        "regmean": RegMeanOptions,
        "fisher": FisherOptions,
        "fedproto": FedProtoOptions,
        "ccvr": CCVROptions,
        "livar+ccvr": CCVROptions,
    }
    for name, options in declared.items():
        assert issubclass(FedConfig, options)
        spec = method_spec(name)
        defaults = {f.name: f.default for f in dataclasses.fields(options)}
        assert set(defaults) <= set(spec.options), name
        factory = spec.load()
        target = factory.__init__ if inspect.isclass(factory) else factory
        params = inspect.signature(target).parameters
        for option, default in defaults.items():
            if option in params:  # the factory's own default
                assert params[option].default == default, (name, option)
            else:  # passed on to CCVRAggregator
                from livar_merge.aggregation.ccvr import CCVRAggregator

                own = inspect.signature(CCVRAggregator.__init__).parameters[option].default
                assert own == default, (name, option)
