//! `/openapi.json` and `/docs`: the OpenAPI document of the legacy API and an HTML page
//! rendered from it on the server (no scripts, no external assets: it works offline).

use serde_json::{json, Value};

use super::DEFAULT_BASE_MODEL;

/// The OpenAPI 3.1 description of every endpoint.
pub fn openapi_document() -> Value {
    let err = |desc: &str| json!({ "description": desc, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } });
    let ok = |desc: &str, schema: Value| json!({ "description": desc, "content": { "application/json": { "schema": schema } } });
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "HiveMind gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The legacy HiveMind REST API, served by a node of the serverless network. Uploaded adapters are validated, stored, and announced into the current federated round; downloads return the round adapter every node committed."
        },
        "paths": {
            "/": { "get": { "summary": "Liveness", "responses": { "200": ok("Server is running", json!({ "type": "object", "properties": { "message": { "type": "string" }, "version": { "type": "string" } } })) } } },
            "/api/v1/status": { "get": { "summary": "Gateway status",
                "parameters": [ { "name": "user_id", "in": "query", "required": false, "schema": { "type": "string" }, "description": "in a network with differential privacy: also report this user's privacy spend (privacy.user)" } ],
                "responses": { "200": ok("Counts and the latest round version", json!({ "$ref": "#/components/schemas/Status" })) } } },
            "/api/v1/adapter/upload": { "post": {
                "summary": "Upload a PEFT LoRA adapter (.safetensors, or .zip of the adapter dir)",
                "requestBody": { "required": true, "content": { "multipart/form-data": { "schema": {
                    "type": "object", "required": ["file", "user_id"],
                    "properties": {
                        "file": { "type": "string", "format": "binary", "description": "adapter_model.safetensors, or a zip of the PEFT adapter dir" },
                        "user_id": { "type": "string", "description": "1-128 bytes; no '/', '\\\\', '..' or control characters" },
                        "base_model": { "type": "string", "default": DEFAULT_BASE_MODEL },
                        "training_samples": { "type": "integer", "default": 0, "minimum": 0 },
                        "epochs": { "type": "integer", "default": 0, "minimum": 0 }
                    } } } } },
                "responses": {
                    "200": ok("Stored and announced", json!({ "type": "object", "properties": { "success": { "type": "boolean" }, "adapter_id": { "type": "string", "description": "<user_id>_<YYYYmmdd_HHMMSS>" }, "message": { "type": "string" }, "privacy": { "$ref": "#/components/schemas/UserPrivacy" } } })),
                    "400": err("Invalid file, adapter or user_id"),
                    "413": err("Upload over the size limit"),
                    "422": err("Missing or non-integer field")
                } } },
            "/api/v1/adapter/list": { "get": {
                "summary": "List uploaded adapters",
                "parameters": [ { "name": "user_id", "in": "query", "required": false, "schema": { "type": "string" } } ],
                "responses": { "200": ok("Uploads, oldest first", json!({ "type": "object", "properties": { "adapters": { "type": "array", "items": { "$ref": "#/components/schemas/Upload" } } } })) } } },
            "/api/v1/aggregate": { "post": {
                "summary": "Close the current round now and wait for its commit",
                "parameters": [ { "name": "version", "in": "query", "required": false, "schema": { "type": "string" }, "description": "accepted for compatibility; rounds are named round-N" } ],
                "responses": {
                    "200": ok("The round's version and size", json!({ "type": "object", "properties": { "success": { "type": "boolean" }, "version": { "type": "string" }, "num_adapters": { "type": "integer" }, "message": { "type": "string" } } })),
                    "400": err("Fewer than 2 users' adapters pending")
                } } },
            "/api/v1/adapter/download/latest": { "get": {
                "summary": "The newest round adapter (safetensors)",
                "responses": { "200": { "description": "hivemind_<version>.safetensors", "content": { "application/octet-stream": { "schema": { "type": "string", "format": "binary" } } } }, "404": err("No aggregated adapter available") } } },
            "/api/v1/adapter/download/{version}": { "get": {
                "summary": "One round adapter by version name (round-N)",
                "parameters": [ { "name": "version", "in": "path", "required": true, "schema": { "type": "string" } } ],
                "responses": { "200": { "description": "hivemind_<version>.safetensors", "content": { "application/octet-stream": { "schema": { "type": "string", "format": "binary" } } } }, "404": err("Version <v> not found") } } },
            "/openapi.json": { "get": { "summary": "This document", "responses": { "200": { "description": "OpenAPI 3.1" } } } },
            "/docs": { "get": { "summary": "Readable API documentation (HTML, works offline)", "responses": { "200": { "description": "HTML" } } } }
        },
        "components": { "schemas": {
            "Error": { "type": "object", "properties": { "detail": { "description": "a message, or for 422 a list of {type, loc, msg, input}" } } },
            "Status": { "type": "object", "properties": {
                "total_adapters": { "type": "integer" }, "total_users": { "type": "integer" },
                "latest_aggregated_version": { "type": ["string", "null"] }, "pending_for_aggregation": { "type": "integer" },
                "privacy": { "type": "object", "description": "networks with differential privacy only", "properties": {
                    "clip": { "type": "number" }, "noise_multiplier": { "type": "number" }, "delta": { "type": "number" },
                    "epsilon_per_round": { "type": "number" }, "epsilon_after_10_rounds": { "type": "number" },
                    "most_releases_by_one_user": { "type": "integer" }, "epsilon_of_that_user": { "type": "number" },
                    "user": { "$ref": "#/components/schemas/UserPrivacy" } } } } },
            "UserPrivacy": { "type": "object", "description": "a user's privacy spend: every upload is one release", "properties": {
                "user_id": { "type": "string" }, "releases": { "type": "integer" }, "epsilon": { "type": "number" } } },
            "Upload": { "type": "object", "properties": {
                "id": { "type": "string" }, "user_id": { "type": "string" }, "path": { "type": "string" },
                "metadata": { "type": "object", "properties": {
                    "user_id": { "type": "string" }, "base_model": { "type": "string" }, "version": { "type": "string", "description": "round-N once in a committed round, else pending" },
                    "uploaded_at": { "type": "string" }, "training_samples": { "type": "integer" }, "epochs": { "type": "integer" } } } } }
        } }
    })
}

pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A self-contained HTML page (no scripts, no external assets) rendered from the OpenAPI
/// document: one section per endpoint with its parameters, form fields and responses.
pub fn docs_html(doc: &Value) -> String {
    let mut out = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>HiveMind gateway API</title>\
         <style>body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}\
         code{background:#f3f3f3;padding:0 .2em}.m{font-weight:bold;color:#fff;padding:.1em .4em;\
         border-radius:3px}.get{background:#2a7}.post{background:#27a}section{border-top:1px solid #ccc;\
         padding:.5em 0}table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.2em .5em}\
         </style></head><body>",
    );
    let info = &doc["info"];
    out.push_str(&format!(
        "<h1>{} {}</h1><p>{}</p><p>Machine-readable: <a href=\"/openapi.json\">/openapi.json</a></p>",
        escape(info["title"].as_str().unwrap_or_default()),
        escape(info["version"].as_str().unwrap_or_default()),
        escape(info["description"].as_str().unwrap_or_default())
    ));
    let empty = serde_json::Map::new();
    for (path, ops) in doc["paths"].as_object().unwrap_or(&empty) {
        for (method, op) in ops.as_object().unwrap_or(&empty) {
            out.push_str(&format!(
                "<section><h2><span class=\"m {method}\">{}</span> <code>{}</code></h2><p>{}</p>",
                method.to_uppercase(),
                escape(path),
                escape(op["summary"].as_str().unwrap_or_default())
            ));
            let mut rows = Vec::new();
            for p in op["parameters"].as_array().into_iter().flatten() {
                rows.push(format!(
                    "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    escape(p["name"].as_str().unwrap_or_default()),
                    escape(p["in"].as_str().unwrap_or_default()),
                    if p["required"].as_bool() == Some(true) {
                        "yes"
                    } else {
                        "no"
                    },
                    escape(p["description"].as_str().unwrap_or_default())
                ));
            }
            let form = &op["requestBody"]["content"]["multipart/form-data"]["schema"];
            let required: Vec<&str> = form["required"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            for (name, field) in form["properties"].as_object().unwrap_or(&empty) {
                let default = field
                    .get("default")
                    .map(|d| format!(" (default {d})"))
                    .unwrap_or_default();
                rows.push(format!(
                    "<tr><td><code>{}</code></td><td>form</td><td>{}</td><td>{}{}</td></tr>",
                    escape(name),
                    if required.contains(&name.as_str()) {
                        "yes"
                    } else {
                        "no"
                    },
                    escape(field["description"].as_str().unwrap_or_default()),
                    escape(&default)
                ));
            }
            if !rows.is_empty() {
                out.push_str(
                    "<table><tr><th>name</th><th>in</th><th>required</th><th>notes</th></tr>",
                );
                out.push_str(&rows.concat());
                out.push_str("</table>");
            }
            out.push_str("<ul>");
            for (code, r) in op["responses"].as_object().unwrap_or(&empty) {
                out.push_str(&format!(
                    "<li><b>{}</b> {}</li>",
                    escape(code),
                    escape(r["description"].as_str().unwrap_or_default())
                ));
            }
            out.push_str("</ul></section>");
        }
    }
    out.push_str(
        "<p>Errors are JSON: <code>{\"detail\": \"...\"}</code> (422: a list of \
         <code>{type, loc, msg, input}</code>).</p></body></html>",
    );
    out
}
