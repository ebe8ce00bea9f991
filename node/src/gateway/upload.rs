//! `POST /api/v1/adapter/upload`: the multipart form, the user id, the file (a
//! `.safetensors`, or a `.zip` of a PEFT dir read with caps on entries and inflated
//! bytes), the adapter checked against the network, then stored and handed to the driver.

use std::io::{Cursor, Read};

use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use hivemind_model::adapter::{AdapterConfig, Limits, LoraAdapter, MAX_CONFIG_BYTES};
use hivemind_protocol::MAX_USER_ID_BYTES;
use hivemind_store::UploadRecord;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::error::{ApiError, ApiResult};
use super::{blocking, Gateway, DEFAULT_BASE_MODEL};
use crate::driver::{version_name, Local, NetSpec, Placement};

/// Most entries a zip upload may hold.
/// Why an upload was refused (the gateway answers 400 with it).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct Rejected(String);

impl From<String> for Rejected {
    fn from(s: String) -> Self {
        Rejected(s)
    }
}

impl From<&str> for Rejected {
    fn from(s: &str) -> Self {
        Rejected(s.to_string())
    }
}

const MAX_ZIP_ENTRIES: usize = 64;

/// Checks a user id: 1 to 128 bytes, no path separators, no `..`, no control characters.
pub fn check_user_id(user_id: &str) -> Result<(), Rejected> {
    if user_id.trim().is_empty() {
        return Err(Rejected::from("user_id must not be empty"));
    }
    if user_id.len() > MAX_USER_ID_BYTES {
        return Err(Rejected::from(format!(
            "user_id is {} bytes long; at most {MAX_USER_ID_BYTES} are allowed",
            user_id.len()
        )));
    }
    if user_id.contains(['/', '\\']) || user_id.contains("..") {
        return Err(Rejected::from(
            "user_id must not contain path separators or '..'",
        ));
    }
    if user_id.chars().any(char::is_control) {
        return Err(Rejected::from(
            "user_id must not contain control characters",
        ));
    }
    Ok(())
}

/// The multipart fields of an upload.
struct UploadForm {
    file: Option<(String, Vec<u8>)>,
    user_id: Option<String>,
    base_model: String,
    training_samples: u64,
    epochs: u64,
}

/// What an uploaded file may hold beyond the network's largest adapter: its config and the
/// other files of a PEFT dir (a tokenizer, a README) when the whole dir is zipped.
const UPLOAD_SLACK: u64 = 32 << 20;

fn too_large(max: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("upload exceeds the limit of {max} bytes"),
    )
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    let status = e.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(status, "upload exceeds the size limit of this gateway");
    }
    ApiError::new(
        status,
        format!("malformed multipart body: {}", e.body_text()),
    )
}

fn int_field(name: &str, text: &str) -> ApiResult<u64> {
    let t = text.trim();
    match t.parse::<i64>() {
        Ok(v) if v >= 0 => Ok(v as u64),
        Ok(_) => Err(ApiError::unprocessable(
            "greater_than_equal",
            name,
            "Input should be greater than or equal to 0",
            json!(t),
        )),
        Err(_) => Err(ApiError::unprocessable(
            "int_parsing",
            name,
            "Input should be a valid integer, unable to parse string as an integer",
            json!(t),
        )),
    }
}

async fn read_form(mut mp: Multipart, max_file: u64) -> ApiResult<UploadForm> {
    let mut form = UploadForm {
        file: None,
        user_id: None,
        base_model: DEFAULT_BASE_MODEL.to_string(),
        training_samples: 0,
        epochs: 0,
    };
    while let Some(mut field) = mp.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "file" => {
                let filename = field.file_name().unwrap_or_default().to_string();
                let mut data = Vec::new();
                let mut seen = 0u64;
                while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                    seen += chunk.len() as u64;
                    // Past the limit the rest is read and dropped (up to the body limit), so
                    // that clients still sending get the 413 instead of a reset connection.
                    if seen <= max_file {
                        data.extend_from_slice(&chunk);
                    }
                }
                if seen > max_file {
                    return Err(too_large(max_file));
                }
                form.file = Some((filename, data));
            }
            "user_id" | "base_model" | "training_samples" | "epochs" => {
                let text = field.text().await.map_err(multipart_error)?;
                if text.len() > 4096 {
                    return Err(ApiError::bad(format!("field {name} is too long")));
                }
                match name.as_str() {
                    "user_id" => form.user_id = Some(text),
                    "base_model" => form.base_model = text,
                    "training_samples" => form.training_samples = int_field(&name, &text)?,
                    _ => form.epochs = int_field(&name, &text)?,
                }
            }
            // Unknown fields are ignored, as FastAPI does.
            _ => while field.chunk().await.map_err(multipart_error)?.is_some() {},
        }
    }
    Ok(form)
}

/// What an uploaded file held: the safetensors bytes and, from a zip, its adapter config.
struct Extracted {
    weights: Vec<u8>,
    config: Option<AdapterConfig>,
}

/// Reads `adapter_model.safetensors` (and `adapter_config.json`) out of a zip, refusing
/// unsafe entry names, too many entries, more than `max` inflated bytes, and an
/// `adapter_config.json` over [`MAX_CONFIG_BYTES`] (what a config on disk may be): a
/// 63 KiB zip of a 64 MiB config was inflated whole before.
fn extract_zip(bytes: &[u8], max: u64) -> Result<Extracted, Rejected> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| format!("not a readable zip file: {e}"))?;
    if zip.len() > MAX_ZIP_ENTRIES {
        return Err(Rejected::from(format!(
            "zip holds {} entries; at most {MAX_ZIP_ENTRIES} are allowed",
            zip.len()
        )));
    }
    let mut weights = None;
    let mut config = None;
    let mut inflated = 0u64;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| format!("zip entry {i}: {e}"))?;
        let name = entry.name().to_string();
        let unsafe_name = name.starts_with('/')
            || name.starts_with('\\')
            || name.contains(':')
            || name.split(['/', '\\']).any(|c| c == "..")
            || entry.enclosed_name().is_none();
        if unsafe_name {
            return Err(Rejected::from(format!(
                "zip entry {name:?} has an absolute path or '..'; refused"
            )));
        }
        if entry.is_dir() {
            continue;
        }
        let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
        let wanted = base == hivemind_model::adapter::WEIGHTS_FILE
            || base == hivemind_model::adapter::CONFIG_FILE;
        if !wanted {
            continue;
        }
        // Read at most what is left of the budget plus one byte: a header that lies about
        // the inflated size cannot make us inflate more.
        let is_config = base == hivemind_model::adapter::CONFIG_FILE;
        let left = max.saturating_sub(inflated);
        let cap = if is_config {
            left.min(MAX_CONFIG_BYTES)
        } else {
            left
        };
        let mut data = Vec::new();
        (&mut entry)
            .take(cap.saturating_add(1))
            .read_to_end(&mut data)
            .map_err(|e| format!("zip entry {name:?}: {e}"))?;
        if is_config && data.len() as u64 > MAX_CONFIG_BYTES {
            return Err(Rejected::from(format!(
                "zip entry {name:?} is larger than {MAX_CONFIG_BYTES} bytes; an adapter config \
                 is a few hundred"
            )));
        }
        inflated += data.len() as u64;
        if inflated > max {
            return Err(Rejected::from(format!(
                "zip content inflates past {max} bytes, more than an adapter of this network \
                 and the upload limit allow (zip bomb?)"
            )));
        }
        if base == hivemind_model::adapter::WEIGHTS_FILE {
            if weights.is_some() {
                return Err(Rejected::from(format!(
                    "zip holds more than one {}",
                    hivemind_model::adapter::WEIGHTS_FILE
                )));
            }
            weights = Some(data);
        } else {
            if config.is_some() {
                return Err(Rejected::from(format!(
                    "zip holds more than one {}",
                    hivemind_model::adapter::CONFIG_FILE
                )));
            }
            config = Some(AdapterConfig::from_json(&data).map_err(|e| format!("{name}: {e}"))?);
        }
    }
    let weights = weights.ok_or_else(|| {
        format!(
            "zip holds no {} (zip the PEFT adapter dir)",
            hivemind_model::adapter::WEIGHTS_FILE
        )
    })?;
    Ok(Extracted { weights, config })
}

/// Checks an uploaded file and returns the adapter's canonical bytes. `max` is the upload
/// limit; no entry inflates past it or past the largest adapter of the network.
pub fn validate_upload(
    spec: &NetSpec,
    filename: &str,
    bytes: &[u8],
    max: u64,
) -> Result<Vec<u8>, Rejected> {
    if bytes.is_empty() {
        return Err(Rejected::from("the file is empty"));
    }
    // No adapter of this network is larger than this (the config beside it is capped apart).
    let max = max.min(spec.max_adapter_bytes());
    let is_zip = bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06");
    let lower = filename.to_ascii_lowercase();
    let extracted = if is_zip {
        extract_zip(bytes, max)?
    } else if lower.ends_with(".zip") {
        return Err(Rejected::from(format!(
            "{filename} is not a readable zip file"
        )));
    } else if lower.ends_with(".safetensors") || bytes.len() >= 9 && bytes[8] == b'{' {
        Extracted {
            weights: bytes.to_vec(),
            config: None,
        }
    } else {
        return Err(Rejected::from(format!(
            "{filename}: expected a .safetensors file or a .zip of a PEFT adapter dir"
        )));
    };
    if let Some(c) = &extracted.config {
        let want = &spec.config;
        if c.r != want.r
            || c.lora_alpha != want.lora_alpha
            || c.target_modules != want.target_modules
        {
            return Err(Rejected::from(format!(
                "adapter_config.json (r={}, lora_alpha={}, target_modules={}) does not fit this \
                 network (r={}, lora_alpha={}, target_modules={})",
                c.r, c.lora_alpha, c.target_modules, want.r, want.lora_alpha, want.target_modules
            )));
        }
    }
    let limits = Limits {
        max_bytes: max,
        ..Limits::DEFAULT
    };
    let adapter: LoraAdapter = spec
        .parse(&extracted.weights, &limits)
        .map_err(|e| Rejected(e.to_string()))?;
    adapter
        .to_safetensors_bytes()
        .map_err(|e| Rejected(e.to_string()))
}

pub(super) async fn upload(
    State(gw): State<Gateway>,
    client: Option<axum::Extension<crate::web::ClientAddr>>,
    headers: axum::http::HeaderMap,
    mp: Result<Multipart, MultipartRejection>,
) -> ApiResult<Json<Value>> {
    // The address's rate, then on a closed gateway the token (which says who uploads), before
    // anything in the body is kept: a refused body is read and dropped (within the body
    // limit), so that the client, still sending, sees the 429 or 401, not a reset connection.
    let checked = gw
        .allow_upload(client.map(|c| c.0))
        .and_then(|()| gw.cfg.auth.upload_user(&headers));
    let authed = match checked {
        Ok(user) => user,
        Err(e) => {
            if let Ok(mut mp) = mp {
                while let Ok(Some(mut field)) = mp.next_field().await {
                    while let Ok(Some(_)) = field.chunk().await {}
                }
            }
            return Err(e);
        }
    };
    let mp = mp.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    // No file is kept past what an adapter of this network (zipped with its config and
    // whatever else a PEFT dir holds) can take: two 300 MiB junk uploads cost 1.2 GB before.
    let max_file = gw
        .cfg
        .max_upload_bytes
        .min(gw.spec.max_adapter_bytes().saturating_add(UPLOAD_SLACK));
    let form = read_form(mp, max_file).await?;
    let Some((filename, bytes)) = form.file else {
        return Err(ApiError::unprocessable(
            "missing",
            "file",
            "Field required",
            Value::Null,
        ));
    };
    let Some(user_id) = form.user_id else {
        return Err(ApiError::unprocessable(
            "missing",
            "user_id",
            "Field required",
            Value::Null,
        ));
    };
    check_user_id(&user_id).map_err(|e| ApiError::bad(e.to_string()))?;
    if authed.as_ref().is_some_and(|u| *u != user_id) {
        return Err(ApiError::new(
            axum::http::StatusCode::UNAUTHORIZED,
            format!("this token does not belong to user_id {user_id:?}"),
        ));
    }
    // Counted only once the user is who the token says (on a closed gateway): one token holder
    // naming another user cannot use up that user's uploads.
    gw.allow_user_upload(&user_id)?;
    if form.base_model.len() > 256 {
        return Err(ApiError::bad("base_model is longer than 256 bytes"));
    }
    let spec = gw.spec.clone();
    let max = gw.cfg.max_upload_bytes;
    let store = gw.store.clone();
    let current = gw.view.borrow().current_round;
    // A private network keeps the sample and epoch counts (they say something about the
    // user's data outside the noise) out of what it stores, lists and announces.
    let private = spec.dp.is_some();
    let (user, samples, epochs, base_model) = (
        user_id.clone(),
        if private { 0 } else { form.training_samples },
        if private { 0 } else { form.epochs },
        form.base_model,
    );
    let (record, len, releases) = blocking(move || {
        let mut canonical = validate_upload(&spec, &filename, &bytes, max)
            .map_err(|e| ApiError::bad(format!("invalid adapter: {e}")))?;
        if private {
            // Each upload is a release; one that would wait behind another (and supersede it)
            // would be a second release of the same user's data for one round.
            // (Checked again where the upload is inserted, against a race.)
            let waiting = store.waiting_upload(&user).map_err(ApiError::internal)?;
            if waiting.is_some() {
                return Err(waiting_conflict(&user));
            }
            // The gateway announces for its users: it releases what they uploaded the way
            // every contributor of a private network does.
            // Checked against the network a moment ago by `validate_upload`: read back only.
            let adapter = LoraAdapter::from_safetensors_bytes(
                spec.config.clone(),
                &canonical,
                &Limits::DEFAULT,
            )
            .map_err(ApiError::internal)?;
            canonical = spec.release(&adapter).map_err(ApiError::internal)?;
        }
        store
            .ensure_room(canonical.len() as u64)
            .map_err(|e| match e {
                low @ hivemind_store::Error::LowDisk { .. } => ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    format!("upload refused, try again later: {low}"),
                ),
                other => ApiError::internal(other),
            })?;
        let hash = store.put_blob(&canonical).map_err(ApiError::internal)?;
        let now = crate::clock::now_ms();
        let stamp = utc(now);
        let base_id = format!("{user}_{}", stamp.compact());
        let mut n = 1;
        loop {
            let id = if n == 1 {
                base_id.clone()
            } else {
                format!("{base_id}_{n}")
            };
            let record = UploadRecord {
                id,
                user_id: user.clone(),
                blob: hash,
                base_model: base_model.clone(),
                version: version_name(current),
                uploaded_at: stamp.iso(),
                training_samples: samples,
                epochs,
                round: None,
            };
            // In a private network the check above is made again in the insert's
            // transaction: of two uploads of one user racing, only one is stored.
            let inserted = if private {
                store.insert_sole_waiting_upload(&record)
            } else {
                store.insert_upload(&record)
            };
            match inserted {
                Ok(()) => {
                    // In a private network, what this release brings the user's spend to. The
                    // upload is stored: a failed read leaves the figure out rather than making
                    // the reply an error the client would retry (and get a 409).
                    let releases = if private {
                        store
                            .user_upload_count(&user)
                            .inspect_err(|e| tracing::warn!(error = %e, "cannot count releases"))
                            .ok()
                    } else {
                        None
                    };
                    return Ok((record, canonical.len() as u64, releases));
                }
                Err(hivemind_store::Error::UploadExists { .. }) if n < 1000 => n += 1,
                Err(hivemind_store::Error::UploadWaiting { .. }) => {
                    // The release just stored is noised afresh (no other upload has its
                    // bytes) and now referenced by nothing: it goes.
                    if let Err(e) = store.remove_blob(&hash) {
                        tracing::warn!(error = %e, "cannot remove a refused upload's blob");
                    }
                    return Err(waiting_conflict(&user));
                }
                Err(e) => return Err(ApiError::internal(e)),
            }
        }
    })
    .await?;
    let (reply, rx) = oneshot::channel();
    gw.local
        .send(Local::Upload {
            hash: record.blob,
            byte_len: len,
            samples: record.training_samples,
            user_id: record.user_id.clone(),
            reply,
        })
        .await
        .map_err(|_| ApiError::internal("the node is shutting down"))?;
    let placement = rx
        .await
        .map_err(|_| ApiError::internal("the node is shutting down"))?
        .map_err(ApiError::internal)?;
    let message = match placement {
        Placement::Round(r) => format!(
            "Adapter uploaded successfully; announced in round {r} (blake3 {})",
            record.blob
        ),
        Placement::Deferred(r) => format!(
            "Adapter uploaded successfully; {} already has an adapter in this round (one per user \
             and round), so this one waits for round {r}, where the user's newest upload is \
             announced (blake3 {})",
            record.user_id, record.blob
        ),
    };
    tracing::info!(upload = %record.id, adapter = %record.blob.short(), ?placement, "gateway upload");
    let mut body = json!({
        "success": true,
        "adapter_id": record.id,
        "message": message,
    });
    if let (Some(dp), Some(releases)) = (&gw.spec.dp, releases) {
        body["privacy"] = super::user_privacy(dp, &record.user_id, releases);
    }
    Ok(Json(body))
}

/// A UTC calendar time, as the legacy server stamps uploads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Utc(time::OffsetDateTime);

impl Utc {
    /// `YYYYmmdd_HHMMSS`, the legacy adapter id suffix.
    pub fn compact(&self) -> String {
        self.format("", "_", "")
    }

    /// `YYYY-mm-ddTHH:MM:SS`.
    pub fn iso(&self) -> String {
        self.format("-", "T", ":")
    }

    fn format(&self, date: &str, mid: &str, time: &str) -> String {
        let t = self.0;
        format!(
            "{:04}{date}{:02}{date}{:02}{mid}{:02}{time}{:02}{time}{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        )
    }
}

/// Unix milliseconds to a UTC calendar time (the epoch for times `time` cannot hold).
pub fn utc(ms: u64) -> Utc {
    let secs = i64::try_from(ms / 1000).unwrap_or(0);
    Utc(time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH))
}

/// The refusal of a second upload waiting for a round, in a network with differential
/// privacy.
fn waiting_conflict(user: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        format!(
            "{user} already has an upload waiting for a round; in a network with differential \
             privacy a user has one upload waiting at a time"
        ),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::driver::NetRule;
    use hivemind_model::adapter::TargetModules;
    use hivemind_model::config::Arch;
    use hivemind_model::testing::{random_adapter, TinyModel};

    fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut buf = Cursor::new(Vec::new());
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (name, bytes) in entries {
            z.start_file(*name, opts).expect("zip entry");
            z.write_all(bytes).expect("zip write");
        }
        z.finish().expect("zip");
        buf.into_inner()
    }

    /// A 64 MiB adapter_config.json (valid JSON: the network's config padded with spaces)
    /// deflates to a few dozen KiB; it used to be inflated and parsed whole, under the
    /// 512 MiB upload limit. Now it is refused at 1 MiB, and the weights entry is held to
    /// the network's adapter size.
    #[test]
    fn a_zip_cannot_inflate_a_config_or_weights_beyond_what_an_adapter_takes() {
        let names = ["q_proj".to_string(), "v_proj".to_string()];
        let shape = TinyModel::new(Arch::Llama, 1)
            .unwrap()
            .cfg
            .adapter_shape(4, &names)
            .unwrap();
        let config = AdapterConfig::new(4, 8.0, TargetModules::from_names(names));
        let spec = NetSpec {
            config: config.clone(),
            shape: shape.clone(),
            rule: NetRule::Iso,
            dp: None,
        };
        let weights = random_adapter(&shape, 8.0, 1)
            .unwrap()
            .to_safetensors_bytes()
            .unwrap();
        let json = serde_json::to_vec(&config).unwrap();
        let upload_limit = 512 << 20;
        let good = zip_of(&[
            ("adapter_model.safetensors", &weights),
            ("adapter_config.json", &json),
        ]);
        assert!(validate_upload(&spec, "a.zip", &good, upload_limit).is_ok());

        let mut padded = json.clone();
        padded.truncate(padded.len() - 1);
        padded.resize(64 << 20, b' ');
        padded.push(b'}');
        let bomb = zip_of(&[
            ("adapter_model.safetensors", &weights),
            ("adapter_config.json", &padded),
        ]);
        assert!(bomb.len() < 256 << 10, "{} bytes", bomb.len());
        match validate_upload(&spec, "a.zip", &bomb, upload_limit) {
            Err(Rejected(why)) => assert!(why.contains("adapter_config.json"), "{why}"),
            Ok(_) => panic!("a 64 MiB adapter config was accepted"),
        }

        let mut big = weights.clone();
        big.resize(spec.max_adapter_bytes() as usize + 1, 0);
        let zipped = zip_of(&[("adapter_model.safetensors", &big)]);
        match validate_upload(&spec, "a.zip", &zipped, upload_limit) {
            Err(Rejected(why)) => assert!(why.contains("zip bomb"), "{why}"),
            Ok(_) => panic!("weights larger than any adapter of the network were accepted"),
        }
    }
}
