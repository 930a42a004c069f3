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
    sections |= {"deployment", "compression", "watermark", "distill"}
    assert set(root) == sections
    rounds = definitions["FederationSection"]["properties"]["rounds"]
    assert rounds["type"] == "integer" and rounds["exclusiveMinimum"] == 0 and rounds["default"] == 3
    quantization = definitions["ModelSection"]["properties"]["quantization"]
    assert quantization["enum"] == ["none", "4bit", "8bit"]
    assert "description" in definitions["FederationSection"]["properties"]["clients_per_round"]
    assert definitions["FederationSection"]["properties"]["runner"]["enum"] == ["threads", "dask", "ray"]
    assert definitions["TrainSection"]["properties"]["objective"]["default"] == "sft"  # DPO, pre-training in the form


def test_the_heterogeneous_flows_take_the_same_config() -> None:
    from flows.knowledge_transfer import knowledge_transfer
    from flows.offsite_tuning import offsite_tuning

    offsite = parameter_schema(offsite_tuning).model_dump_for_openapi()["properties"]
    assert {"config", "adaptor_layers", "keep_every"} <= set(offsite)
    assert {"config", "share_knowledge"} <= set(
        parameter_schema(knowledge_transfer).model_dump_for_openapi()["properties"]
    )


def test_baselines_take_the_same_config() -> None:
    for flow in (local_only, centralized):
        assert "config" in parameter_schema(flow).model_dump_for_openapi()["properties"]
