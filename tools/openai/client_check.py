"""The official `openai` Python client against a node's chat API (run by tests/openai_api.rs).

Lists the models, asks one question without and with streaming for each model named on the
command line, and prints one JSON line: what the client saw (ids, answers, finish reasons, usage,
the number of streamed chunks), for the Rust test to compare with its own computation.

    python tools/openai/client_check.py --base-url http://127.0.0.1:PORT/v1 \
        --model round --model base --prompt "Hello" --max-tokens 16
"""

import argparse
import json
import sys

import openai


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--api-key", default="unused", help="the node's --api-key (any text when it has none)")
    args = p.parse_args()

    # A node without --api-key needs no key; the client insists on one being set.
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=120)
    out = {"client_version": openai.__version__, "models": [m.id for m in client.models.list()]}
    answers = {}
    for model in args.model:
        messages = [{"role": "user", "content": args.prompt}]
        r = client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=args.max_tokens
        )
        streamed, chunks, finish, usage = [], 0, None, None
        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            temperature=0,
            max_tokens=args.max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            chunks += 1
            if chunk.usage is not None:
                usage = chunk.usage.model_dump()
            for c in chunk.choices:
                if c.delta.content:
                    streamed.append(c.delta.content)
                if c.finish_reason:
                    finish = c.finish_reason
        answers[model] = {
            "id": r.id,
            "object": r.object,
            "content": r.choices[0].message.content,
            "role": r.choices[0].message.role,
            "finish_reason": r.choices[0].finish_reason,
            "usage": r.usage.model_dump() if r.usage else None,
            "streamed": "".join(streamed),
            "stream_chunks": chunks,
            "stream_finish_reason": finish,
            "stream_usage": usage,
        }
    out["answers"] = answers
    try:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
        out["unknown_model"] = "accepted"
    except openai.NotFoundError as e:
        out["unknown_model"] = {"status": e.status_code, "code": e.code, "message": e.message}
    # The same calls with a wrong key.
    wrong = openai.OpenAI(base_url=args.base_url, api_key=args.api_key + "-wrong", max_retries=0, timeout=120)
    try:
        wrong.models.list()
        out["wrong_key"] = "accepted"
    except openai.AuthenticationError as e:
        out["wrong_key"] = {"status": e.status_code, "code": e.code}
    # Parameters this server does not implement are refused, naming the parameter.
    try:
        client.chat.completions.create(
            model=args.model[0],
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        )
        out["tools"] = "accepted"
    except openai.BadRequestError as e:
        out["tools"] = {"status": e.status_code, "param": e.param, "code": e.code}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
