"""The YAML config loader: positions of every problem, interpolation, secret files, safety, JSON Schema."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, field_validator

from config import (
    MAX_ALIAS_NODES,
    AppConfig,
    ConfigValidationError,
    ConnectorSettings,
    LoadedConfig,
    Problem,
    config_json_schema,
    load_config,
    loads,
)
from connectors.errors import ConfigError
from connectors.interfaces import CrmSource, Ledger
from connectors.registry import registered


class FakeCrmSettings(ConnectorSettings):
    type: Literal["fakecrm"]
    token: SecretStr
    account: str
    region: Literal["eu", "us"] = "eu"

    @field_validator("token")
    @classmethod
    def _prefixed(cls, v: SecretStr) -> SecretStr:
        # Careless on purpose, as a third-party connector might be: the message quotes the value.
        if not v.get_secret_value().startswith("pat-"):
            raise ValueError(f"token {v.get_secret_value()} must start with pat-")
        return v


class FakeCrm(CrmSource):
    vendor: ClassVar[str] = "fakecrm"
    Settings: ClassVar[type[ConnectorSettings]] = FakeCrmSettings


class FakeLedgerSettings(ConnectorSettings):
    type: Literal["fakeledger"]
    api_key: SecretStr
    tenant: str


class FakeLedger(Ledger):
    vendor: ClassVar[str] = "fakeledger"
    Settings: ClassVar[type[ConnectorSettings]] = FakeLedgerSettings


@pytest.fixture(autouse=True)
def fake_connectors() -> Iterator[None]:
    with registered("crm", "fakecrm", FakeCrm), registered("ledger", "fakeledger", FakeLedger):
        yield


VALID = """\
state:
  url: sqlite:///state.db
pipelines:
  main:
    crm:
      type: fakecrm
      token: pat-crm-token
      account: acme
    ledger:
      type: fakeledger
      api_key: ledger-key
      tenant: t-1
    taxes:
      map:
        20: TAX001
        5.50: TAX003
      missing_rate: 5.5
    items:
      map:
        "1001": {item_code: "1001", account_code: "706"}
"""


def write(tmp_path: Path, text: str, name: str = "ledgerbridge.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems(path: Path, env: Mapping[str, str] | None = None) -> list[str]:
    """The rendered problem lines of a file that must fail to load."""
    with pytest.raises(ConfigValidationError) as info:
        load_config(path, env={} if env is None else env)
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
    return str(info.value).splitlines()


def test_valid_file_loads_with_typed_connector_settings(tmp_path: Path) -> None:
    """A valid file gives the AppConfig plus each pipeline's connector class and validated settings."""
    path = write(tmp_path, VALID)
    loaded = load_config(path, env={})
    assert isinstance(loaded, LoadedConfig)
    assert isinstance(loaded.app, AppConfig)
    assert loaded.path == path
    crm = loaded.crm("main")
    assert isinstance(crm, FakeCrmSettings)
    assert crm.token.get_secret_value() == "pat-crm-token"
    assert crm.account == "acme"
    assert loaded.crm_class("main") is FakeCrm
    assert loaded.ledger_class("main") is FakeLedger
    ledger = loaded.ledger("main")
    assert isinstance(ledger, FakeLedgerSettings)
    assert ledger.api_key.get_secret_value() == "ledger-key"
    assert loaded.app.pipelines["main"].items.map["1001"].account_code == "706"


def test_loaded_config_keeps_secrets_wrapped(tmp_path: Path) -> None:
    """Neither the AppConfig nor the settings show a secret in their repr; model_dump keeps SecretStr."""
    loaded = load_config(write(tmp_path, VALID), env={})
    assert "pat-crm-token" not in repr(loaded.app)
    assert "ledger-key" not in repr(loaded.app)
    assert "pat-crm-token" not in repr(loaded.crm("main"))
    dumped = loaded.crm("main").model_dump()
    assert isinstance(dumped["token"], SecretStr)
    assert FakeCrmSettings.model_validate(dumped) == loaded.crm("main")


def test_unknown_pipeline_name_is_a_config_error(tmp_path: Path) -> None:
    """Asking a LoadedConfig for a pipeline it does not have raises a ConfigError naming the known ones."""
    loaded = load_config(write(tmp_path, VALID), env={})
    with pytest.raises(ConfigError, match="no pipeline named 'other'; pipelines: main"):
        loaded.crm("other")


def test_tax_rates_and_decimals_keep_their_written_digits(tmp_path: Path) -> None:
    """Rates given as YAML numbers become the Decimal of their text, never via binary floating point."""
    invoice = "\n    invoice: {amount_tolerance: 0.12345678901234567890}"
    text = VALID.replace("missing_rate: 5.5", "missing_rate: 5.5" + invoice)
    app = load_config(write(tmp_path, text), env={}).app
    taxes = app.pipelines["main"].taxes
    assert list(taxes.map) == [Decimal("20"), Decimal("5.50")]
    assert str(list(taxes.map)[1]) == "5.50"
    assert taxes.missing_rate == Decimal("5.5")
    assert str(app.pipelines["main"].invoice.amount_tolerance) == "0.12345678901234567890"


def test_bad_indentation(tmp_path: Path) -> None:
    """A mis-indented line is reported at its own line and column, as a YAML syntax problem."""
    path = write(
        tmp_path,
        """\
        pipelines:
          main:
            crm:
              type: fakecrm
             token: pat-x
        """,
    )
    assert problems(path) == [
        f"{path}:5:6: bad indentation: this line does not line up with the block above it"
        " (while parsing a block mapping at line 3, column 5)"
    ]


def test_tab_indentation(tmp_path: Path) -> None:
    """A tab used for indentation is reported where it is."""
    path = write(tmp_path, "pipelines:\n\tmain: {}\n")
    assert problems(path) == [f"{path}:2:1: a tab character: indent with spaces"]


def test_unknown_key_at_top_level(tmp_path: Path) -> None:
    """An unknown top-level key is reported at the key."""
    path = write(tmp_path, VALID + "bogus: 1\n")
    assert problems(path) == [f"{path}:21:1: bogus: unknown key"]


def test_unknown_key_in_a_pipeline(tmp_path: Path) -> None:
    """An unknown key inside a pipeline is reported at the key with its full path."""
    path = write(tmp_path, VALID.replace("    taxes:\n", "    page_sise: 50\n    taxes:\n"))
    assert problems(path) == [f"{path}:13:5: pipelines.main.page_sise: unknown key"]


def test_unknown_key_in_a_connector_block(tmp_path: Path) -> None:
    """An unknown key in a crm block is found by the connector's settings model and placed at the key."""
    path = write(tmp_path, VALID.replace("      account: acme\n", "      account: acme\n      colour: red\n"))
    assert problems(path) == [f"{path}:9:7: pipelines.main.crm.colour: unknown key"]


def test_wrong_type_points_at_the_value(tmp_path: Path) -> None:
    """A value of the wrong type is reported at the value, with pydantic's message but not the value."""
    path = write(tmp_path, VALID.replace("    taxes:\n", "    page_size: lots\n    taxes:\n"))
    assert problems(path) == [
        f"{path}:13:16: pipelines.main.page_size: Input should be a valid integer, unable to parse string as an integer"
    ]


def test_wrong_type_in_a_connector_block(tmp_path: Path) -> None:
    """A bad value in a connector block is placed at the value, under pipelines.<name>.crm."""
    path = write(tmp_path, VALID.replace("      account: acme\n", "      account: acme\n      region: mars\n"))
    assert problems(path) == [f"{path}:9:15: pipelines.main.crm.region: Input should be 'eu' or 'us'"]


def test_number_where_text_is_expected_gets_a_hint(tmp_path: Path) -> None:
    """An unquoted number given for a text field says to quote it."""
    path = write(tmp_path, VALID.replace('account_code: "706"', "account_code: 706"))
    assert problems(path) == [
        f"{path}:20:51: pipelines.main.items.map.1001.account_code: Input should be a valid string"
        " (this is a number: put it in quotes to make it text)"
    ]


def test_missing_required_key_points_at_the_parent(tmp_path: Path) -> None:
    """A missing required key is reported at the key of the mapping that lacks it."""
    path = write(tmp_path, VALID.replace("      account: acme\n", ""))
    assert problems(path) == [f"{path}:5:5: pipelines.main.crm.account: required key is missing"]


def test_missing_pipelines_points_at_the_top(tmp_path: Path) -> None:
    """A file without pipelines says so at the start of the top-level mapping."""
    path = write(tmp_path, "state:\n  url: sqlite:///x.db\n")
    assert problems(path) == [f"{path}:1:1: pipelines: required key is missing"]


def test_missing_connector_type(tmp_path: Path) -> None:
    """A connector block without a type is reported once, at the block's key."""
    path = write(tmp_path, VALID.replace("      type: fakeledger\n", ""))
    assert problems(path) == [f"{path}:9:5: pipelines.main.ledger.type: required key is missing"]


def test_missing_variable(tmp_path: Path) -> None:
    """A ${VAR} that is not set is reported at its value, naming the variable, with no follow-up problem."""
    path = write(tmp_path, VALID.replace("token: pat-crm-token", "token: ${CRM_TOKEN}"))
    assert problems(path, env={"OTHER": "pat-other-value"}) == [
        f"{path}:7:14: pipelines.main.crm.token: environment variable CRM_TOKEN is not set"
        " (give a default: ${CRM_TOKEN:-...})"
    ]


def test_variables_whole_and_embedded(tmp_path: Path) -> None:
    """${VAR} replaces a whole value or a part of one, and a number-typed field accepts the text."""
    text = VALID.replace("token: pat-crm-token", "token: ${CRM_TOKEN}").replace(
        "      account: acme\n", "      account: acme\n      base_url: https://${HOST}/v3\n"
    )
    text = text.replace("    taxes:\n", "    page_size: ${PAGE}\n    taxes:\n")
    loaded = load_config(write(tmp_path, text), env={"CRM_TOKEN": "pat-env", "HOST": "api.test", "PAGE": "50"})
    assert loaded.crm("main").token.get_secret_value() == "pat-env"  # type: ignore[attr-defined]
    assert loaded.crm("main").base_url == "https://api.test/v3"
    assert loaded.app.pipelines["main"].page_size == 50


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, "acme-default"), ({"ACCOUNT": ""}, "acme-default"), ({"ACCOUNT": "from-env"}, "from-env")],
)
def test_variable_default(tmp_path: Path, env: dict[str, str], expected: str) -> None:
    """${VAR:-default} gives the default when the variable is unset or empty, the value otherwise."""
    path = write(tmp_path, VALID.replace("account: acme", "account: ${ACCOUNT:-acme-default}"))
    assert load_config(path, env=env).crm("main").account == expected  # type: ignore[attr-defined]


def test_escaped_dollar_brace_is_literal(tmp_path: Path) -> None:
    """$${ stands for a literal ${ and is not looked up."""
    path = write(tmp_path, VALID.replace("tenant: t-1", 'tenant: "$${NOT_A_VAR}-$$x"'))
    assert load_config(path, env={}).ledger("main").tenant == "${NOT_A_VAR}-$$x"  # type: ignore[attr-defined]


def test_malformed_reference(tmp_path: Path) -> None:
    """A ${...} that is not a variable reference, or is not closed, is a problem at its value."""
    path = write(tmp_path, VALID.replace("tenant: t-1", "tenant: ${1BAD}").replace("account: acme", "account: a${B"))
    assert problems(path) == [
        f"{path}:8:16: pipelines.main.crm.account: a ${{ has no closing }}",
        f"{path}:12:15: pipelines.main.ledger.tenant: malformed variable reference:"
        " use ${NAME} or ${NAME:-default}",
    ]


def test_duplicate_key(tmp_path: Path) -> None:
    """A key given twice in one mapping is reported at the second one, citing the first."""
    path = write(tmp_path, VALID.replace("      tenant: t-1\n", "      tenant: t-1\n      tenant: t-2\n"))
    assert problems(path) == [
        f"{path}:13:7: pipelines.main.ledger.tenant: duplicate key (first given at line 12, column 7)"
    ]


def test_equal_tax_rates_written_differently(tmp_path: Path) -> None:
    """Tax map keys that are the same rate (20 and 20.0) are a problem, not a silent overwrite."""
    path = write(tmp_path, VALID.replace("        5.50: TAX003\n", "        5.50: TAX003\n        20.0: TAX009\n"))
    assert problems(path) == [
        f'{path}:17:9: pipelines.main.taxes.map["20.0"]: the same rate as the key at line 15, column 9'
    ]


def test_unknown_connector_type(tmp_path: Path) -> None:
    """An unknown connector type is reported at the type's value, listing the available connectors."""
    path = write(tmp_path, VALID.replace("type: fakecrm", "type: fakecrn"))
    [line] = problems(path)
    assert line.startswith(f"{path}:6:13: pipelines.main.crm.type: unknown crm connector type; available: ")
    assert "fakecrm" in line.split("available: ")[1].split(", ")
    assert "fakecrn" not in line


def test_secret_from_file(tmp_path: Path) -> None:
    """<field>_file reads a SecretStr field from a file relative to the config, without the final newline."""
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "crm-token").write_text("pat-from-file\n")
    (tmp_path / "fernet.key").write_text("state-key\r\n")
    text = VALID.replace("token: pat-crm-token", "token_file: secrets/crm-token").replace(
        "  url: sqlite:///state.db\n", "  url: sqlite:///state.db\n  secret_key_file: fernet.key\n"
    )
    loaded = load_config(write(tmp_path, text), env={})
    assert loaded.crm("main").token.get_secret_value() == "pat-from-file"  # type: ignore[attr-defined]
    assert loaded.app.state.secret_key is not None
    assert loaded.app.state.secret_key.get_secret_value() == "state-key"


def test_secret_file_missing(tmp_path: Path) -> None:
    """An unreadable secret file is reported at its value, naming the path."""
    path = write(tmp_path, VALID.replace("token: pat-crm-token", "token_file: secrets/nope"))
    assert problems(path) == [
        f"{path}:7:19: pipelines.main.crm.token_file: cannot read the secret file {tmp_path}/secrets/nope:"
        " No such file or directory"
    ]


def test_missing_secret_mentions_the_file_form(tmp_path: Path) -> None:
    """A missing required secret says it can also be given as <field>_file."""
    path = write(tmp_path, VALID.replace("      api_key: ledger-key\n", ""))
    assert problems(path) == [
        f"{path}:9:5: pipelines.main.ledger.api_key: required key is missing"
        " (or give api_key_file: the path of a file holding it)"
    ]


def test_secret_and_secret_file_both_given(tmp_path: Path) -> None:
    """Giving both <field> and <field>_file is a problem at the _file key."""
    (tmp_path / "tok").write_text("pat-file")
    path = write(tmp_path, VALID.replace("token: pat-crm-token", "token: pat-crm-token\n      token_file: tok"))
    assert problems(path) == [f"{path}:8:7: pipelines.main.crm.token_file: give either token or token_file, not both"]


def test_file_suffix_only_for_secret_fields(tmp_path: Path) -> None:
    """A _file key for a field that is not a secret is an unknown key."""
    path = write(tmp_path, VALID.replace("account: acme", "account_file: acme.txt"))
    assert problems(path) == [
        f"{path}:5:5: pipelines.main.crm.account: required key is missing",
        f"{path}:8:7: pipelines.main.crm.account_file: unknown key",
    ]


def test_bad_pipeline_name_is_reported_at_its_key(tmp_path: Path) -> None:
    """A pipeline name that breaks the naming rule is reported at that name, even beside other problems."""
    path = write(tmp_path, VALID.replace("  main:", "  Main Line:").replace("      account: acme\n", ""))
    assert problems(path) == [
        f"{path}:4:3: pipelines[\"Main Line\"]: pipeline name 'Main Line': use 1-40 of a-z 0-9 _ -,"
        " starting with a letter or digit",
        f'{path}:5:5: pipelines["Main Line"].crm.account: required key is missing',
    ]


ALL_AT_ONCE = """\
bogus: true
state:
  url: sqlite:///state.db
pipelines:
  main:
    crm:
      type: fakecrm
      token: ${CRM_TOKEN}
    ledger:
      type: fakeledger
      api_key: k
      tenant: t-1
      tenant: t-2
    page_size: lots
    colour: red
  second:
    crm: {type: nosuch}
    ledger: {type: fakeledger, api_key: k, tenant: t}
"""


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    """One file with many faults yields all of them, in file order, each at its own place."""
    path = write(tmp_path, ALL_AT_ONCE)
    lines = problems(path)
    assert lines[0] == f"{path}:1:1: bogus: unknown key"
    assert lines[1] == f"{path}:6:5: pipelines.main.crm.account: required key is missing"
    assert lines[2] == (
        f"{path}:8:14: pipelines.main.crm.token: environment variable CRM_TOKEN is not set"
        " (give a default: ${CRM_TOKEN:-...})"
    )
    assert lines[3] == f"{path}:13:7: pipelines.main.ledger.tenant: duplicate key (first given at line 12, column 7)"
    assert lines[4] == (
        f"{path}:14:16: pipelines.main.page_size: Input should be a valid integer, unable to parse string as an integer"
    )
    assert lines[5] == f"{path}:15:5: pipelines.main.colour: unknown key"
    assert lines[6].startswith(f"{path}:17:17: pipelines.second.crm.type: unknown crm connector type; available: ")
    assert len(lines) == 7


def test_problem_rendering() -> None:
    """A problem renders as FILE:LINE:COL: key.path: message, and without place when it has none."""
    assert str(Problem("c.yaml", 3, 7, "a.b", "bad")) == "c.yaml:3:7: a.b: bad"
    assert str(Problem("c.yaml", 3, 7, "", "bad")) == "c.yaml:3:7: bad"
    assert str(Problem("c.yaml", 0, 0, "", "gone")) == "c.yaml: gone"


def test_error_is_a_config_error_without_chained_exceptions(tmp_path: Path) -> None:
    """The error is a ConfigError carrying no chained pydantic or YAML exception (they hold raw input)."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, ALL_AT_ONCE), env={})
    assert info.value.__cause__ is None
    assert info.value.__context__ is None


CANARY = "CANARY-7f3a9c21e0"


def test_secrets_never_appear_in_problems(tmp_path: Path) -> None:
    """Secret values, from the file, from a _file or from the environment, never reach the error text."""
    (tmp_path / "key.txt").write_text(CANARY + "-file\n")
    path = write(
        tmp_path,
        f"""\
        state:
          secret_key: {CANARY}-state
          url: 42
        pipelines:
          main:
            crm:
              type: fakecrm
              token: {CANARY}
              account: acme
              timeout_s: fast
            ledger:
              type: fakeledger
              api_key_file: key.txt
              tenant: ["${{ENV_SECRET}}"]
          {CANARY}x:
            crm: {{type: fakecrm, token: "pat-{CANARY}", account: [1]}}
            ledger: {{type: fakeledger, api_key: "{CANARY}", tenant: 5}}
        """,
    )
    with pytest.raises(ConfigValidationError) as info:
        load_config(path, env={"ENV_SECRET": CANARY + "-env"})
    text = str(info.value)
    assert f"{path}:8:14: pipelines.main.crm.token: token [REDACTED] must start with pat-" in text
    assert f"{path}:10:18: pipelines.main.crm.timeout_s: Input should be a valid number" in text
    assert f"{path}:14:15: pipelines.main.ledger.tenant: Input should be a valid string" in text
    checked = text + repr(info.value.problems) + repr(info.value.args)
    assert CANARY not in checked.replace(f"{CANARY}x", "")  # the pipeline name is a key, not a secret
    assert "-env" not in checked


def test_python_tags_are_rejected(tmp_path: Path) -> None:
    """A !!python tag is a problem at its value, and nothing it names is run."""
    marker = tmp_path / "ran"
    path = write(tmp_path, VALID.replace("tenant: t-1", f'tenant: !!python/object/apply:os.system ["touch {marker}"]'))
    assert problems(path) == [
        f"{path}:12:15: pipelines.main.ledger.tenant: the YAML tag !!python/object/apply:os.system is not allowed here"
    ]
    assert not marker.exists()


def test_custom_tag_on_a_key_is_rejected(tmp_path: Path) -> None:
    """A local tag on a key is a problem at the key."""
    path = write(tmp_path, VALID + "!env bogus: 1\n")
    assert problems(path) == [f"{path}:21:1: the YAML tag !env is not allowed here"]


def test_anchors_merge_keys_and_extension_keys(tmp_path: Path) -> None:
    """x- keys hold anchors; aliases and << merges share blocks, explicit keys overriding merged ones."""
    path = write(
        tmp_path,
        """\
        x-crm: &crm
          type: fakecrm
          token: pat-shared
          account: shared
        x-taxes: &taxes
          map: {20: TAX001}
        pipelines:
          one:
            crm: *crm
            ledger: &ledger {type: fakeledger, api_key: k, tenant: t}
            taxes: *taxes
          two:
            crm:
              <<: *crm
              account: own
            ledger: *ledger
            taxes: *taxes
        """,
    )
    loaded = load_config(path, env={})
    assert loaded.crm("one").account == "shared"  # type: ignore[attr-defined]
    assert loaded.crm("two").account == "own"  # type: ignore[attr-defined]
    assert loaded.crm("two").token.get_secret_value() == "pat-shared"  # type: ignore[attr-defined]
    assert loaded.app.pipelines["two"].taxes.map == {Decimal("20"): "TAX001"}


def test_alias_bomb_is_rejected(tmp_path: Path) -> None:
    """A 'billion laughs' file stops at the alias budget with one problem, quickly."""
    lines = ["x-a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 10):
        lines.append(f"x-a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    path = write(tmp_path, "\n".join(lines) + "\npipelines: {}\n")
    [line] = problems(path)
    assert line.endswith(f"aliases copy more than {MAX_ALIAS_NODES} nodes in all")
    assert line.startswith(f"{path}:4:")


def test_recursive_alias_is_rejected(tmp_path: Path) -> None:
    """An alias to a node that contains it is a problem, not an endless structure."""
    path = write(tmp_path, "x-loop: &loop [*loop]\npipelines: {}\n")
    assert problems(path) == [f"{path}:1:16: x-loop[0]: an alias refers to a node that contains it"]


def test_empty_and_non_mapping_files(tmp_path: Path) -> None:
    """An empty file and a file that is a list are each one clear problem."""
    empty = write(tmp_path, "# nothing\n", "empty.yaml")
    assert problems(empty) == [f"{empty}:1:1: the file is empty; it must be a mapping with at least a 'pipelines' key"]
    listing = write(tmp_path, "- a\n- b\n", "list.yaml")
    assert problems(listing) == [f"{listing}:1:1: the file must be a mapping (key: value lines) with a 'pipelines' key"]


def test_unreadable_config_file(tmp_path: Path) -> None:
    """A config path that does not exist is a problem naming the file."""
    path = tmp_path / "absent.yaml"
    assert problems(path) == [f"{path}: cannot read the file: No such file or directory"]


def test_loads_names_its_source() -> None:
    """Text validated with loads() uses the given source name in problems."""
    with pytest.raises(ConfigValidationError) as info:
        loads("pipelines: []\n", source="inline.yaml", env={})
    assert str(info.value) == "inline.yaml:1:12: pipelines: Input should be a valid dictionary"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.sampled_from([*"ab:-[]{}&*!<>$'\"\n\t #|%@`,?", "pipelines", "  ", "${X}", "\u00e9", "&a", "*a", "<<"]),
        max_size=40,
    ).map("".join)
)
def test_arbitrary_text_only_raises_config_problems(text: str) -> None:
    """Whatever the text, loading it succeeds or raises ConfigValidationError with placed problems."""
    found: list[Problem] = []
    try:
        loads(text, source="fuzz.yaml", env={})
    except ConfigValidationError as exc:
        found = exc.problems
        assert found
    assert all(p.file == "fuzz.yaml" and p.line >= 1 and p.col >= 1 for p in found)


def test_json_schema_offers_connectors_as_one_of() -> None:
    """The JSON Schema is valid Draft 2020-12 and lists each connector's settings under oneOf by type."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = config_json_schema()
    json.dumps(schema)  # plain JSON
    jsonschema.Draft202012Validator.check_schema(schema)
    pipeline = schema["$defs"]["Pipeline"]
    variants = {v["properties"]["type"]["const"]: v for v in pipeline["properties"]["crm"]["oneOf"]}
    assert variants["fakecrm"]["$ref"] == "#/$defs/FakeCrmSettings"
    assert "fakeledger" in {v["properties"]["type"]["const"] for v in pipeline["properties"]["ledger"]["oneOf"]}
    assert "token_file" in schema["$defs"]["FakeCrmSettings"]["properties"]


@pytest.mark.parametrize(
    ("crm", "valid"),
    [
        ({"type": "fakecrm", "token": "pat-x", "account": "a"}, True),
        ({"type": "fakecrm", "token_file": "tok", "account": "a"}, True),
        ({"type": "fakecrm", "account": "a"}, False),
        ({"type": "fakecrm", "token": "pat-x", "token_file": "tok", "account": "a"}, False),
        ({"type": "fakecrm", "token": "pat-x", "account": "a", "colour": "red"}, False),
        ({"type": "nosuch", "token": "pat-x", "account": "a"}, False),
    ],
)
def test_json_schema_checks_connector_blocks(crm: dict[str, Any], valid: bool) -> None:
    """Instances pass or fail the JSON Schema as the loader would judge them."""
    jsonschema = pytest.importorskip("jsonschema")
    instance = {
        "x-anchors": {"anything": 1},
        "pipelines": {"main": {"crm": crm, "ledger": {"type": "fakeledger", "api_key": "k", "tenant": "t"}}},
    }
    errors = list(jsonschema.Draft202012Validator(config_json_schema()).iter_errors(instance))
    assert (not errors) is valid
