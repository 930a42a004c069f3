"""The flows' parameters are the typed config, which Prefect turns into the UI's run form."""

from prefect.utilities.callables import parameter_schema

from flows.centralized import centralized
from flows.federated_finetune import federated_finetune
from flows.local_only import local_only


def test_config_parameter_becomes_a_typed_form_with_every_section() -> None:
    schema = parameter_schema(federated_finetune).model_dump_for_openapi()
    assert set(schema["properties"]) == {"config", "resume", "prepare_data", "init_adapter"}
    definitions = schema["definitions"]
    root = definitions["FedConfig"]["properties"]
    sections = {"model", "peft", "data", "federation", "train", "eval", "tracking", "secagg", "record_dp"}
    sections |= {"deployment", "compression"}
    assert set(root) == sections
    rounds = definitions["FederationSection"]["properties"]["rounds"]
    assert rounds["type"] == "integer" and rounds["exclusiveMinimum"] == 0 and rounds["default"] == 3
    quantization = definitions["ModelSection"]["properties"]["quantization"]
    assert quantization["enum"] == ["none", "4bit", "8bit"]
    assert "description" in definitions["FederationSection"]["properties"]["clients_per_round"]
    assert definitions["FederationSection"]["properties"]["runner"]["enum"] == ["threads", "dask", "ray"]


def test_baselines_take_the_same_config() -> None:
    for flow in (local_only, centralized):
        assert "config" in parameter_schema(flow).model_dump_for_openapi()["properties"]
