"""The DSPy adapter with dspy's DummyLM: the same outputs as dspy run directly, no state
shared between LM configurations, caches, and every error kind."""

import io
import json
import os
import pickle
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import List

import dspy
import pytest
from dspy.clients.base_lm import GLOBAL_HISTORY
from dspy.utils import DummyLM

from pyherd_worker import HandlerError, dspy_adapter, handlers, protocol, runtime

ANSWERS = {
    "capital of France": {"reasoning": "France's capital is Paris.", "answer": "Paris"},
    "2 + 2": {"reasoning": "Two and two make four.", "answer": "4"},
    "": {"reasoning": "No idea.", "answer": "unknown"},
}
QUESTIONS = ["What is the capital of France?", "What is 2 + 2?", "Who wrote Hamlet?"]
UNREACHABLE = {"model": "openai/gpt-4o-mini", "api_base": "http://127.0.0.1:9/v1", "api_key": "sk-test", "num_retries": 0}
#: The most fields of a signature, as the README states it.
FIELD_CAP = 256


def dummy(answers=None):
    return {"provider": "dummy", "answers": ANSWERS if answers is None else answers}


def create(program_id="qa", signature="question -> answer", **extra):
    return dspy_adapter.create_program({"id": program_id, "signature": signature, **extra})


def execute(definition, inputs, lm):
    return dspy_adapter.execute_program({"program_id": "qa", "inputs": inputs, "program": definition, "lm": lm})


def error_of(func, args):
    with pytest.raises(HandlerError) as caught:
        func(args)
    return caught.value


def test_loading_the_adapter_declares_it():
    assert "dspy" in handlers.adapters()
    for name in ("configure_lm", "create_program", "execute_program"):
        assert name in handlers.registry()


@pytest.mark.parametrize("program_type, module", [("predict", dspy.Predict), ("chain_of_thought", dspy.ChainOfThought)])
def test_outputs_equal_dspy_run_directly(program_type, module):
    definition = create(program_type=program_type)["definition"]
    direct = module("question -> answer")
    for question in QUESTIONS:
        with dspy.context(lm=DummyLM(ANSWERS)):
            expected = direct(question=question).toDict()
        result = execute(definition, {"question": question}, dummy())
        assert result["outputs"] == expected
        assert result["program_id"] == "qa" and result["duration_ms"] >= 0
    assert dspy.settings.lm is None, "no process-wide LM is ever configured"


def test_different_lm_configurations_never_share_answers():
    definition = create()["definition"]
    alice, bob = dummy({"": {"answer": "alice"}}), dummy({"": {"answer": "bob"}})
    for i in range(20):
        lm, name = (alice, "alice") if i % 2 else (bob, "bob")
        assert execute(definition, {"question": f"q{i}"}, lm)["outputs"] == {"answer": name}


def test_the_same_answers_in_another_order_are_another_lm():
    # The dummy LM answers with the first key found in the prompt, and "" is in every
    # prompt: one order answers "Paris", the other "unknown", whichever ran first.
    definition = create()["definition"]
    france_first = dummy({"France": {"answer": "Paris"}, "": {"answer": "unknown"}})
    catch_all_first = dummy({"": {"answer": "unknown"}, "France": {"answer": "Paris"}})
    question = {"question": "What is the capital of France?"}
    for _ in range(2):
        assert execute(definition, question, france_first)["outputs"] == {"answer": "Paris"}
        assert execute(definition, question, catch_all_first)["outputs"] == {"answer": "unknown"}


def test_modules_and_lms_are_built_once_per_definition_and_configuration():
    definition = create(program_id="cached", signature="text -> summary")["definition"]
    lm = dummy({"": {"summary": "short"}})
    execute(definition, {"text": "a"}, lm)
    modules, lms = dspy_adapter._modules.builds, dspy_adapter._lms.builds
    for i in range(5):
        execute(json.loads(json.dumps(definition)), {"text": str(i)}, json.loads(json.dumps(lm)))
    assert (dspy_adapter._modules.builds, dspy_adapter._lms.builds) == (modules, lms)
    execute({**definition, "instructions": "Be terse."}, {"text": "b"}, lm)
    assert dspy_adapter._modules.builds == modules + 1


def test_the_cache_forgets_the_oldest_entry_beyond_its_size():
    cache = dspy_adapter._Cache(2, sort_keys=True)
    for value in (1, 2, 3):
        cache.get(value, lambda v: v * 10)
    assert cache.get(1, lambda v: -1) == -1  # 1 was dropped and built again
    assert cache.get(3, lambda v: -1) == 30


@pytest.mark.parametrize("sort_keys, builds", [(True, 1), (False, 2)])
def test_the_cache_tells_key_orders_apart_only_when_asked(sort_keys, builds):
    cache = dspy_adapter._Cache(4, sort_keys=sort_keys)
    for value in ({"a": 1, "b": {"c": 2, "d": 3}}, {"b": {"d": 3, "c": 2}, "a": 1}):
        cache.get(value, dict)
    assert cache.builds == builds


def test_signatures_become_canonical_definitions():
    created = create(signature="context, question -> answer", program_type="chain_of_thought", instructions="Cite.")
    assert created == {
        "program_id": "qa",
        "signature": "context, question -> answer",
        "program_type": "chain_of_thought",
        "definition": {
            "inputs": [{"name": "context", "description": None}, {"name": "question", "description": None}],
            "outputs": [{"name": "answer", "description": None}],
            "program_type": "chain_of_thought",
            "instructions": "Cite.",
        },
    }
    structured = create(
        signature={"inputs": [{"name": "question", "description": "what is asked"}], "outputs": [{"name": "answer"}]}
    )
    assert structured["signature"] == "question -> answer"
    assert structured["definition"]["inputs"] == [{"name": "question", "description": "what is asked"}]
    assert structured["program_type"] == "predict"


def test_typed_fields_reach_dspy_and_give_the_outputs_of_dspy_run_directly():
    signature = "question, n: int -> answers: list[str], score: float, sure: bool"
    answers = {"": {"answers": '["a", "b"]', "score": "0.5", "sure": "true"}}
    created = create(signature=signature)
    assert created["signature"] == signature
    inputs = created["definition"]["inputs"]
    assert inputs == [{"name": "question", "description": None}, {"name": "n", "description": None, "type": "int"}]
    fields = dspy_adapter._modules.get(created["definition"], dspy_adapter._build_program).module.signature.fields
    annotations = {name: field.annotation for name, field in fields.items()}
    assert annotations == {"question": str, "n": int, "answers": List[str], "score": float, "sure": bool}
    with dspy.context(lm=DummyLM(answers)):
        expected = dspy.Predict(signature)(question="q", n=3).toDict()
    result = execute(created["definition"], {"question": "q", "n": 3}, dummy(answers))
    assert result["outputs"] == expected == {"answers": ["a", "b"], "score": 0.5, "sure": True}
    # str is every field's default type: saying it, or null, makes the same definition.
    assert create(signature="question: str -> answer")["definition"] == create()["definition"]
    untyped = create(signature={"inputs": [{"name": "question", "type": None}], "outputs": ["answer"]})
    assert untyped["definition"] == create()["definition"]
    spaced = create(signature={"inputs": ["question"], "outputs": [{"name": "ids", "type": "list[ int ]"}]})
    assert spaced["signature"] == "question -> ids: list[int]"


@pytest.mark.parametrize(
    "signature, inputs",
    [
        ("n: int -> answer", {"n": "three"}),
        ("n: int -> answer", {"n": True}),
        ("n: int -> answer", {"n": 1.5}),
        ("n: int -> answer", {"n": 2**64}),
        ("x: float -> answer", {"x": "0.5"}),
        ("flag: bool -> answer", {"flag": 1}),
        ("tags: list[str] -> answer", {"tags": "a, b"}),
        ("tags: list[str] -> answer", {"tags": ["a", 2]}),
        ("xs: list[float] -> answer", {"xs": [1, None]}),
    ],
)
def test_an_input_not_of_its_type_is_invalid_inputs(signature, inputs):
    definition = create(signature=signature)["definition"]
    e = error_of(lambda a: execute(definition, a, dummy({"": {"answer": "x"}})), inputs)
    assert (e.category, e.kind) == ("invalid_request", "invalid_inputs"), str(e)
    assert next(iter(inputs)) in str(e)


def test_inputs_of_their_type_run_and_str_inputs_take_any_value():
    lm = dummy({"": {"answer": "ok"}})
    typed = create(signature="n: int, x: float, flags: list[bool] -> answer")["definition"]
    assert execute(typed, {"n": -3, "x": 2, "flags": []}, lm)["outputs"] == {"answer": "ok"}
    untyped = create()["definition"]
    assert execute(untyped, {"question": {"any": ["json"]}}, lm)["outputs"] == {"answer": "ok"}


def user_message(signature, inputs):
    """The prompt's last message, as dspy's ChatAdapter writes it for these inputs."""
    return dspy.ChatAdapter().format(dspy.Signature(signature), demos=[], inputs=inputs)[-1]["content"]


@pytest.mark.parametrize(
    "value, text",
    [
        ([1, 2], "[1, 2]"),
        ([None], "[null]"),
        ([True], "[true]"),
        ([1, "x", True, None, 1.5], '[1, "x", true, null, 1.5]'),
        (["é", 2**70], '["é", 1180591620717411303424]'),
        ([{"a": None}], '[{"a": null}]'),  # dspy would write Python's repr: «{'a': None}»
        ([["x"], "y"], '[["x"], "y"]'),
    ],
)
def test_a_str_input_given_a_list_of_other_values_gets_its_json_text(value, text):
    # dspy numbers the items of a list given to a str field, and breaks on an item that is
    # not a string; the JSON text is what it writes for a list in a field of another type.
    definition = create(signature="question -> answer")["definition"]
    prompt = f"[[ ## question ## ]]\n{text}\n\nRespond"
    assert prompt in user_message("question -> answer", {"question": text})
    assert execute(definition, {"question": value}, dummy({prompt: {"answer": "seen"}}))["outputs"] == {"answer": "seen"}


@pytest.mark.parametrize("value", ["plain", "", "[1, 2]", ["a", "b"], ["one\nline"], [], {"k": [1, None]}, 7, None])
def test_other_str_inputs_reach_dspy_as_they_are(value):
    # The whole user message dspy writes for the value itself, so nothing changed it.
    definition = create(signature="question -> answer")["definition"]
    prompt = user_message("question -> answer", {"question": value})
    assert execute(definition, {"question": value}, dummy({prompt: {"answer": "same"}}))["outputs"] == {"answer": "same"}


def test_typed_list_inputs_reach_dspy_as_lists():
    definition = create(signature="question: list[int] -> answer")["definition"]
    prompt = user_message("question: list[int] -> answer", {"question": [1, 2]})
    assert execute(definition, {"question": [1, 2]}, dummy({prompt: {"answer": "same"}}))["outputs"] == {"answer": "same"}


@pytest.mark.parametrize("field, type_name, answer", [("n", "int", "many"), ("x", "float", "nan"), ("n", "int", "9" * 25)])
def test_an_answer_that_is_not_a_json_value_of_its_type_is_an_lm_error(field, type_name, answer):
    definition = create(signature=f"question -> {field}: {type_name}")["definition"]
    e = error_of(lambda a: execute(definition, {"question": "q"}, a), dummy({"": {field: answer}}))
    assert (e.category, e.kind) == ("python", "lm_error"), str(e)


def test_every_type_but_str_has_a_check():
    assert set(dspy_adapter.TYPE_CHECKS) == set(dspy_adapter.FIELD_TYPES) - {"str"}


def test_a_type_with_a_comma_is_refused_by_its_name():
    e = error_of(dspy_adapter.create_program, {"id": "p", "signature": "question -> answer: dict[str, int]"})
    assert (e.category, e.kind) == ("invalid_request", "invalid_signature"), str(e)
    assert "not 'dict[str, int]'" in str(e)


@pytest.mark.parametrize(
    "signature",
    [
        "question answer",
        "question -> ",
        " -> answer",
        "a -> b -> c",
        "question: Foo -> answer",
        "question -> answer: dict[str, int]",
        "question: -> answer",
        ": str -> answer",
        "question, question -> answer",
        "q -> q",
        "1st -> answer",
        {"inputs": []},
        {"inputs": [{"name": "q"}], "outputs": []},
        {"inputs": [{"name": "q", "kind": "x"}], "outputs": [{"name": "a"}]},
        {"inputs": [{"name": "q", "description": 5}], "outputs": [{"name": "a"}]},
        {"inputs": [{"name": "q", "type": 5}], "outputs": [{"name": "a"}]},
        {"inputs": [{"name": "q"}], "outputs": [{"name": "a", "type": "object"}]},
        {"inputs": [{"name": "q"}], "outputs": [{"name": "a"}], "extra": 1},
        42,
        None,
    ],
)
def test_bad_signatures_are_invalid_signature(signature):
    e = error_of(dspy_adapter.create_program, {"id": "p", "signature": signature})
    assert (e.category, e.kind) == ("invalid_request", "invalid_signature"), str(e)


def many_fields(count):
    """A signature of `count` fields: one output, the rest inputs, as a string and as an object."""
    inputs = [f"in{i}" for i in range(count - 1)]
    return f"{', '.join(inputs)} -> answer", {"inputs": inputs, "outputs": ["answer"]}


@pytest.mark.parametrize("form", [0, 1])
def test_a_signature_beyond_the_field_cap_is_invalid_signature(form):
    signature = many_fields(FIELD_CAP + 1)[form]
    e = error_of(dspy_adapter.create_program, {"id": "p", "signature": signature})
    assert (e.category, e.kind) == ("invalid_request", "invalid_signature"), str(e)
    assert f"at most {FIELD_CAP} fields" in str(e) and f"not {FIELD_CAP + 1}" in str(e)
    assert dspy_adapter.MAX_FIELDS == FIELD_CAP
    definition = create(signature="question -> answer")["definition"]
    beyond = {**definition, "inputs": [{"name": f"in{i}"} for i in range(FIELD_CAP)]}
    e = error_of(lambda a: execute(beyond, a, dummy()), {f"in{i}": "x" for i in range(FIELD_CAP)})
    assert (e.category, e.kind) == ("invalid_request", "invalid_signature"), str(e)


@pytest.mark.parametrize("form", [0, 1])
def test_a_signature_at_the_field_cap_is_accepted_and_still_checked(form):
    string, structured = many_fields(FIELD_CAP)
    created = create(signature=(string, structured)[form])
    assert len(created["definition"]["inputs"]) == FIELD_CAP - 1
    inputs = {f"in{i}": str(i) for i in range(FIELD_CAP - 1)}
    assert execute(created["definition"], inputs, dummy({"": {"answer": "ok"}}))["outputs"] == {"answer": "ok"}
    twice = string.replace("in1,", "in0,", 1)
    e = error_of(dspy_adapter.create_program, {"id": "p", "signature": twice})
    assert (e.category, e.kind) == ("invalid_request", "invalid_signature"), str(e)
    assert str(e).endswith("field names appear twice: in0")


@pytest.mark.filterwarnings("ignore:Field name .* shadows an attribute")
@pytest.mark.parametrize(
    "signature, program_type, name",
    [
        ("lm -> answer", "predict", "lm"),
        ("demos, question -> answer", "predict", "demos"),  # dspy would take it as demonstrations
        ("config -> answer", "predict", "config"),
        ("self -> answer", "chain_of_thought", "self"),
        ("new_signature -> answer", "predict", "new_signature"),
        ("prediction -> answer", "predict", "prediction"),  # dspy would send it as OpenAI's predicted outputs
        ("question, prediction -> answer", "chain_of_thought", "prediction"),
        ("reasoning -> answer", "chain_of_thought", "reasoning"),  # CoT's own output would hide it
        ("fields -> answer", "predict", "fields"),  # an attribute of dspy.Signature
        ("question -> model_config", "predict", "model_config"),
    ],
)
def test_field_names_dspy_keeps_for_itself_are_invalid_signature(signature, program_type, name):
    e = error_of(dspy_adapter.create_program, {"id": "p", "signature": signature, "program_type": program_type})
    assert (e.category, e.kind) == ("invalid_request", "invalid_signature"), str(e)
    assert name in str(e)


def test_names_reserved_only_as_chain_of_thought_inputs_are_fine_elsewhere():
    lm = dummy({"": {"answer": "yes", "lm": "out", "reasoning": "because"}})
    predict = create(signature="reasoning -> answer")["definition"]
    assert execute(predict, {"reasoning": "r"}, lm)["outputs"] == {"answer": "yes"}
    outputs = create(signature="question -> lm, reasoning", program_type="chain_of_thought")["definition"]
    assert execute(outputs, {"question": "q"}, lm)["outputs"] == {"reasoning": "because", "lm": "out"}


@pytest.mark.parametrize(
    "args, kind",
    [
        ({"signature": "q -> a"}, "malformed_request"),
        ({"id": "", "signature": "q -> a"}, "malformed_request"),
        ({"id": "p", "signature": "q -> a", "surprise": 1}, "malformed_request"),
        ({"id": "p", "signature": "q -> a", "instructions": 3}, "malformed_request"),
        ({"id": "p", "signature": "q -> a", "program_type": "react"}, "invalid_program_type"),
        ([], "malformed_request"),
    ],
)
def test_bad_create_program_arguments_are_named(args, kind):
    e = error_of(dspy_adapter.create_program, args)
    assert (e.category, e.kind) == ("invalid_request", kind), str(e)


def test_configure_lm_validates_and_never_answers_the_key():
    assert dspy_adapter.configure_lm(dummy()) == {"provider": "dummy", "model": "dummy"}
    answer = dspy_adapter.configure_lm(UNREACHABLE)
    assert answer == {"provider": "litellm", "model": "openai/gpt-4o-mini"}
    assert "sk-test" not in json.dumps(answer)


@pytest.mark.parametrize(
    "config",
    [
        {"provider": "dummy"},
        {"provider": "dummy", "answers": {"": "not a dict"}},
        {"provider": "dummy", "answers": {}, "model": "x"},
        {"provider": "elsewhere", "model": "x"},
        {},
        {"model": ""},
        {"model": "openai/x", "temperature": "hot"},
        {"model": "openai/x", "max_tokens": True},
        {"model": "openai/x", "cache": "yes"},
        {"model": "openai/x", "api_secret": "k"},
        {"model": "openai/x", "temperature": -0.5},
        {"model": "openai/x", "temperature": float("nan")},
        {"model": "openai/x", "max_tokens": 0},
        {"model": "openai/x", "num_retries": -1},
        "openai/x",
    ],
)
def test_bad_lm_configurations_are_invalid_lm_config(config):
    e = error_of(dspy_adapter.configure_lm, config)
    assert (e.category, e.kind) == ("invalid_request", "invalid_lm_config"), str(e)


@pytest.fixture
def fresh_dspy_cache(tmp_path, monkeypatch):
    """An empty dspy response cache in a temporary folder, for this test only."""
    monkeypatch.setattr(dspy, "cache", dspy.cache)  # put back after the test
    dspy.configure_cache(disk_cache_dir=str(tmp_path / "dspy"))


@pytest.fixture
def openai_server():
    """Start fake OpenAI-compatible servers on 127.0.0.1: `openai_server(answer)` gives the
    server's API base and the list of the Authorization headers of the calls it answered."""
    servers = []

    def start(answer):
        calls = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                calls.append(self.headers.get("Authorization"))
                content = f"[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]"
                reply = {
                    "id": f"chatcmpl-{len(calls)}",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
                data = json.dumps(reply).encode()
                self.send_response(200 if self.path == "/v1/chat/completions" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # a free port
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}/v1", calls

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_sessions_with_other_api_bases_never_share_answers(fresh_dspy_cache, openai_server):
    # dspy's cache key leaves out api_key and api_base: with its cache on, the second
    # session would get the first one's answer without its own server being called.
    definition = create()["definition"]
    (alice_base, alice_calls), (bob_base, bob_calls) = openai_server("alice"), openai_server("bob")
    alice = {"model": "openai/gpt-4o-mini", "api_base": alice_base, "api_key": "sk-alice"}
    bob = {"model": "openai/gpt-4o-mini", "api_base": bob_base, "api_key": "sk-bob"}
    for _ in range(2):
        for lm, name in ((alice, "alice"), (bob, "bob")):
            assert execute(definition, {"question": "Who are you?"}, lm)["outputs"] == {"answer": name}
    assert (alice_calls, bob_calls) == (["Bearer sk-alice"] * 2, ["Bearer sk-bob"] * 2)


def test_cache_true_opts_into_dspys_response_cache(fresh_dspy_cache, openai_server):
    definition = create()["definition"]
    base, calls = openai_server("cached")
    lm = {"model": "openai/gpt-4o-mini", "api_base": base, "api_key": "sk-test", "cache": True}
    for _ in range(2):
        assert execute(definition, {"question": "Again?"}, lm)["outputs"] == {"answer": "cached"}
    assert len(calls) == 1


def test_a_configuration_dspy_lm_refuses_is_invalid_lm_config():
    # Every key passes the adapter's own checks; dspy.LM refuses the temperature of a reasoning model.
    e = error_of(dspy_adapter.configure_lm, {"model": "openai/o1", "temperature": 0.5})
    assert (e.category, e.kind) == ("invalid_request", "invalid_lm_config"), str(e)
    assert "dspy.LM refused the configuration" in str(e) and "temperature" in str(e)


def test_a_signature_dspy_refuses_says_why():
    # A valid identifier, but pydantic (under dspy.Signature) keeps leading underscores.
    e = error_of(dspy_adapter.create_program, {"id": "p", "signature": "_draft -> answer"})
    assert (e.category, e.kind) == ("invalid_request", "invalid_signature"), str(e)
    assert "dspy refused the signature: " in str(e) and "underscore" in str(e)
    assert "clashing" not in str(e)


def test_without_dspy_the_adapter_says_how_to_install_it():
    hide_dspy = "import sys; sys.modules['dspy'] = None; import pyherd_worker.dspy_adapter"
    env = dict(os.environ, PYTHONPATH=str(Path(dspy_adapter.__file__).parent.parent))
    out = subprocess.run([sys.executable, "-c", hide_dspy], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode != 0
    assert "ImportError: the DSPy adapter needs dspy in this interpreter" in out.stderr, out.stderr
    assert "`pyherd setup`" in out.stderr


def test_an_integer_beyond_64_bits_is_still_a_cache_key():
    # The stdlib codec decodes such integers; orjson cannot encode them.
    config = {"model": "openai/gpt-4o-mini", "max_tokens": 2**70}
    assert dspy_adapter.configure_lm(config) == {"provider": "litellm", "model": "openai/gpt-4o-mini"}
    assert dspy_adapter._lms.get(config, lambda c: pytest.fail("built twice")) is not None


def test_dspy_keeps_no_history_or_trace_of_the_calls():
    definition = create(program_id="private", signature="secret -> answer")["definition"]
    lm_config = dummy({"": {"answer": "kept?"}})
    execute(definition, {"secret": "warm-up"}, lm_config)
    lm = dspy_adapter._lms.get(lm_config, None)
    before = (len(GLOBAL_HISTORY), len(dspy.settings.trace))
    for i in range(3):
        execute(definition, {"secret": f"session data {i}"}, lm_config)
    assert lm.history == []
    assert (len(GLOBAL_HISTORY), len(dspy.settings.trace)) == before
    assert "session data" not in repr(list(GLOBAL_HISTORY)[-5:])


@pytest.mark.parametrize(
    "change, kind",
    [
        (lambda d: {k: v for k, v in d.items() if k != "outputs"}, "malformed_request"),
        (lambda d: {**d, "extra": 1}, "malformed_request"),
        (lambda d: {**d, "instructions": ["not", "text"]}, "malformed_request"),
        (lambda d: {**d, "program_type": "react"}, "invalid_program_type"),
        (lambda d: {**d, "inputs": [{"name": "not valid"}]}, "invalid_signature"),
        (lambda d: {**d, "inputs": [{"name": "demos"}]}, "invalid_signature"),
        (lambda d: {**d, "outputs": []}, "invalid_signature"),
    ],
)
def test_a_definition_not_made_by_create_program_is_refused_by_execute_program(change, kind):
    definition = change(create()["definition"])
    e = error_of(lambda a: execute(definition, a, dummy()), {"question": "q"})
    assert (e.category, e.kind) == ("invalid_request", kind), str(e)


def test_inputs_must_match_the_program():
    definition = create()["definition"]
    for inputs in ({}, {"question": "q", "extra": 1}, ["q"], None):
        e = error_of(lambda a: execute(definition, a, dummy()), inputs)
        assert (e.category, e.kind) == ("invalid_request", "invalid_inputs"), str(e)


def test_a_call_without_the_definition_or_an_lm_is_refused():
    e = error_of(dspy_adapter.execute_program, {"program_id": "qa", "inputs": {"question": "q"}})
    assert e.kind == "malformed_request"
    e = error_of(lambda a: execute(create()["definition"], a, None), {"question": "q"})
    assert (e.category, e.kind) == ("invalid_request", "lm_not_configured")


def test_a_failing_lm_is_an_lm_error():
    definition = create()["definition"]
    e = error_of(lambda a: execute(definition, a, UNREACHABLE), {"question": "q"})
    assert (e.category, e.kind) == ("python", "lm_error")
    assert "127.0.0.1:9" in str(e)
    copy = pickle.loads(pickle.dumps(e))
    assert (copy.category, copy.kind, str(copy)) == (e.category, e.kind, str(e))


def test_an_answer_that_cannot_be_parsed_is_an_lm_error():
    definition = create()["definition"]
    e = error_of(lambda a: execute(definition, a, dummy({"": {"not_the_answer": "x"}})), {"question": "q"})
    assert (e.category, e.kind) == ("python", "lm_error")
    assert "parsed" in str(e)


def test_a_handler_bug_is_not_mistaken_for_an_lm_error(monkeypatch):
    definition = create(program_id="buggy", signature="topic -> joke")["definition"]

    def broken(self, **kwargs):
        raise ZeroDivisionError("a bug in a module")

    monkeypatch.setattr(dspy.Predict, "forward", broken)
    with pytest.raises(ZeroDivisionError):
        execute(definition, {"topic": "x"}, dummy({"": {"joke": "x"}}))


@pytest.mark.parametrize("codec_name", ["stdlib", "orjson"])
def test_through_the_worker_loop_errors_keep_their_kind(codec_name):
    worker = runtime.Worker(io.BytesIO(), io.BytesIO(), "w1", 1 << 20, protocol.select_codec(codec_name))
    definition = create()["definition"]
    msg = {
        "t": "call",
        "id": 5,
        "cmd": "execute_program",
        "args": {"program_id": "qa", "inputs": {"question": "q"}, "program": definition, "lm": UNREACHABLE},
    }
    reply = json.loads(worker.reply_body(msg))
    assert (reply["t"], reply["id"], reply["category"], reply["kind"]) == ("err", 5, "python", "lm_error")
    msg["args"]["lm"] = dummy()
    reply = json.loads(worker.reply_body(msg))
    assert reply == {"t": "ok", "id": 5, "result": {**reply["result"], "outputs": {"answer": "unknown"}}}
