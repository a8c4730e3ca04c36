#!/usr/bin/env python3
"""mistguard around Mistral chat completions, in Python.

1. Classify the prompt (DIRECTION_INPUT) before it goes to Mistral; refuse to send it when the
   action is RESTRICT or worse (RESTRICT, RATE_LIMIT, BLOCK, HARD_BLOCK); send the sanitized
   text on SANITIZE.
2. Stream the chat completion (client.chat.stream) through ClassifyStream (DIRECTION_OUTPUT),
   printing only `released_text`, and stop on a block.
3. Ask for tool calls (client.chat.complete with tools=) and guard each with AuthorizeToolCall
   before running it: run it only when the decision is ALLOW.

Configuration (environment):
  MISTGUARD_ADDR      the daemon, host:port (default 127.0.0.1:50051)
  MISTGUARD_TOKEN     sent as `authorization: Bearer <token>` when set
  MISTRAL_API_KEY     Mistral's API key
  MISTRAL_SERVER_URL  Mistral's base URL (default https://api.mistral.ai)
  MISTRAL_MODEL       the model (default mistral-small-latest)

Usage: python main.py ["the prompt"]

The gRPC code is generated from the repository's proto/ at every start, into a temporary
directory (grpcio-tools); nothing generated is committed.
"""

import atexit
import json
import os
import shutil
import sys
import tempfile

import grpc
from grpc_tools import protoc
from mistralai.client import Mistral

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.environ.get("MISTGUARD_PROTO_DIR", os.path.join(HERE, "..", "..", "proto"))


def load_protos():
    """Generates guard_pb2 and guard_pb2_grpc from proto/ into a temporary directory."""
    out = tempfile.mkdtemp(prefix="mistguard-pb-")
    atexit.register(shutil.rmtree, out, True)
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            os.path.join(PROTO_DIR, "mistguard", "v1", "guard.proto"),
        ]
    )
    if rc != 0:
        sys.exit(f"protoc failed ({rc}) on {PROTO_DIR}")
    sys.path.insert(0, out)
    from mistguard.v1 import guard_pb2, guard_pb2_grpc  # noqa: E402 (generated just now)

    return guard_pb2, guard_pb2_grpc


pb, pb_grpc = load_protos()

SUBJECT = "example-python"
DEFAULT_PROMPT = "What is the weather in Paris? And clean up the old staging database."
# The caller's context for AuthorizeToolCall (what the policies' `context` sees).
TOOL_CONTEXT = {"environment": "production", "user_role": "developer"}

# The tools offered to the model, in Mistral's function-calling format.
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "delete_database",
            "description": "Deletes a database",
            "parameters": {
                "type": "object",
                "properties": {"name": {"type": "string"}},
                "required": ["name"],
            },
        },
    },
]


def get_weather(city):
    return f"sunny, 21 C in {city}"


def delete_database(name):
    return f"database {name} deleted"


RUNNABLE = {"get_weather": get_weather, "delete_database": delete_database}


def action_name(a):
    return pb.Action.Name(a).removeprefix("ACTION_")


def blocks(a):
    return a >= pb.ACTION_BLOCK


def metadata():
    token = os.environ.get("MISTGUARD_TOKEN")
    return [("authorization", f"Bearer {token}")] if token else []


def classify_prompt(guard, prompt):
    """Step 1: the text to send to Mistral (the prompt, or its sanitized text), or None when the
    prompt must not go: RESTRICT (do not fulfil as asked), RATE_LIMIT, BLOCK, HARD_BLOCK."""
    r = guard.Classify(
        pb.ClassifyRequest(text=prompt, direction=pb.DIRECTION_INPUT, subject=SUBJECT),
        metadata=metadata(),
    )
    rules = ",".join(sorted({h.rule_id for h in r.hits})) or "-"
    print(f"prompt verdict: {action_name(r.action)} (rules {rules}, decision {r.decision_id})")
    if r.message:
        print(f"prompt message: {r.message}")
    if r.action >= pb.ACTION_RESTRICT:
        print("refused: the prompt was not sent to Mistral")
        return None
    if r.action == pb.ACTION_SANITIZE and r.HasField("sanitized_text"):
        return r.sanitized_text
    return prompt


def text_of(content):
    """A delta's content: a string, or a list of chunks (their text parts)."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(getattr(c, "text", "") or "" for c in content)


def stream_completion(guard, mistral, model, prompt):
    """Step 2: the streamed completion, through ClassifyStream; prints only released_text."""
    events = mistral.chat.stream(model=model, messages=[{"role": "user", "content": prompt}])

    def chunks():
        first = True
        for event in events:
            for choice in event.data.choices:
                text = text_of(choice.delta.content)
                if not text:
                    continue
                if first:
                    first = False
                    yield pb.ClassifyStreamRequest(
                        text=text, direction=pb.DIRECTION_OUTPUT, subject=SUBJECT
                    )
                else:
                    yield pb.ClassifyStreamRequest(text=text)

    responses = guard.ClassifyStream(chunks(), metadata=metadata())
    print("completion:")
    end = None
    try:
        for r in responses:
            if r.released_text:
                sys.stdout.write(r.released_text)
                sys.stdout.flush()
            if blocks(r.action):
                end = r
                break
            if r.final:
                end = r
                break
    finally:
        responses.cancel()
        events.close()
    print()
    if end is not None and blocks(end.action):
        rules = ",".join(sorted({h.rule_id for h in end.hits})) or "-"
        print(f"stream blocked: {action_name(end.action)} (rules {rules}, reason {end.reason})")
        if end.message:
            print(f"stream message: {end.message}")
    elif end is not None:
        print(f"stream end: {action_name(end.action)} (reason {end.reason})")


def guard_tool_calls(guard, mistral, model, prompt):
    """Step 3: the completion's tool_calls, each authorized before it runs."""
    res = mistral.chat.complete(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        tools=TOOLS,
        tool_choice="auto",
    )
    calls = res.choices[0].message.tool_calls or []
    print(f"tool calls: {len(calls)}")
    for call in calls:
        name = call.function.name
        args = call.function.arguments
        args_json = args if isinstance(args, str) else json.dumps(args)
        d = guard.AuthorizeToolCall(
            pb.AuthorizeToolCallRequest(
                tool=name,
                arguments_json=args_json,
                context_json=json.dumps(TOOL_CONTEXT),
                subject=SUBJECT,
                request_id=call.id if call.id and call.id != "null" else "",
            ),
            metadata=metadata(),
        )
        decision = pb.ToolDecision.Name(d.decision).removeprefix("TOOL_DECISION_")
        print(f"tool {name}: {decision} (policy {d.policy or '-'}: {d.reason})")
        if d.decision == pb.TOOL_DECISION_ALLOW and name in RUNNABLE:
            result = RUNNABLE[name](**json.loads(args_json or "{}"))
            print(f"ran {name}: {result}")
        elif d.decision == pb.TOOL_DECISION_REQUIRE_APPROVAL:
            print(f"not run: {name} (approval {d.approval_id} by {', '.join(d.approvers)})")
        else:
            print(f"not run: {name}")


def main():
    prompt = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_PROMPT
    addr = os.environ.get("MISTGUARD_ADDR", "127.0.0.1:50051")
    for scheme in ("http://", "grpc://"):
        addr = addr.removeprefix(scheme)
    model = os.environ.get("MISTRAL_MODEL", "mistral-small-latest")
    mistral = Mistral(
        api_key=os.environ.get("MISTRAL_API_KEY", ""),
        server_url=os.environ.get("MISTRAL_SERVER_URL", "https://api.mistral.ai"),
    )
    with grpc.insecure_channel(addr) as channel:
        guard = pb_grpc.GuardStub(channel)
        prompt = classify_prompt(guard, prompt)
        if prompt is None:
            return 0
        stream_completion(guard, mistral, model, prompt)
        guard_tool_calls(guard, mistral, model, prompt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
