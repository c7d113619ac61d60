//! The model configuration: hyperparameters, activation, quantization scheme, special tokens.

use std::path::Path;

use serde_json::Value;

use crate::{Error, Result};

/// The FFN activation applied to the gate projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `relu(x)^2`: BitNet b1.58 2B-4T and the transformers `BitNetForCausalLM`.
    Relu2,
    /// `x * sigmoid(x)`: 1bitLLM-style (Llama-architecture) BitNet models.
    Silu,
}

impl Activation {
    /// Parses the names used by transformers configs and GGUF metadata.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "relu2" | "relu_squared" | "squared_relu" => Ok(Activation::Relu2),
            "silu" | "swish" => Ok(Activation::Silu),
            other => Err(Error::Config(format!(
                "unsupported activation `{other}` (expected relu2 or silu)"
            ))),
        }
    }

    /// The canonical name (`relu2`, `silu`).
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu2 => "relu2",
            Activation::Silu => "silu",
        }
    }
}

/// How the linear weights of a Hugging Face checkpoint are stored (FORMATS.md section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// Full-precision master weights, quantized with the absmean formula (once, at load).
    Master,
    /// uint8-packed codes with `weight_scale = 1 / absmean` (`bitlinear`, offline).
    PackedInverseScale,
    /// uint8-packed codes with `weight_scale = absmean` (`autobitlinear`, offline).
    PackedDirectScale,
}

/// Everything the engine needs to know about a model's shape and conventions.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the FFN.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA groups).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f32,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether the output head is the token embedding.
    pub tie_word_embeddings: bool,
    /// FFN activation.
    pub activation: Activation,
    /// Storage of the linear weights.
    pub weight_format: WeightFormat,
    /// Beginning-of-sequence token, if the model has one.
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
}

fn get_usize(v: &Value, key: &str) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| Error::Config(format!("`{key}` must be a non-negative integer"))),
    }
}

fn require_usize(v: &Value, key: &str) -> Result<usize> {
    get_usize(v, key)?.ok_or_else(|| Error::Config(format!("`{key}` is missing")))
}

fn get_f32(v: &Value, key: &str) -> Result<Option<f32>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(|n| Some(n as f32))
            .ok_or_else(|| Error::Config(format!("`{key}` must be a number"))),
    }
}

/// Token ids given as a number or a list of numbers (`eos_token_id` may be either).
fn token_ids(v: &Value, key: &str) -> Result<Vec<u32>> {
    let bad = || Error::Config(format!("`{key}` must be a token id or a list of token ids"));
    match v.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|x| x.as_u64().map(|n| n as u32).ok_or_else(bad))
            .collect(),
        Some(x) => Ok(vec![x.as_u64().ok_or_else(bad)? as u32]),
    }
}

impl ModelConfig {
    /// Reads a transformers `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        Self::from_hf_json(&v).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Builds the configuration from a parsed transformers `config.json`.
    pub fn from_hf_json(v: &Value) -> Result<Self> {
        let hidden_size = require_usize(v, "hidden_size")?;
        let num_heads = require_usize(v, "num_attention_heads")?;
        let num_kv_heads = get_usize(v, "num_key_value_heads")?.unwrap_or(num_heads);
        if num_heads == 0 {
            return Err(Error::Config(
                "`num_attention_heads` must be positive".into(),
            ));
        }
        let head_dim = match get_usize(v, "head_dim")? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(Error::Config(format!(
                    "hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}"
                )))
            }
        };
        let rope_theta = match get_f32(v, "rope_theta")? {
            Some(t) => t,
            None => match v.get("rope_parameters") {
                Some(p) => get_f32(p, "rope_theta")?.unwrap_or(10000.0),
                None => 10000.0,
            },
        };
        for key in ["rope_scaling", "rope_parameters"] {
            if let Some(kind) = v
                .get(key)
                .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
                .and_then(Value::as_str)
            {
                if kind != "default" {
                    return Err(Error::Config(format!(
                        "RoPE type `{kind}` in `{key}` is not supported (only default RoPE)"
                    )));
                }
            }
        }
        let activation = match v.get("hidden_act").and_then(Value::as_str) {
            Some(a) => Activation::parse(a)?,
            None => Activation::Relu2,
        };
        let weight_format = match v.get("quantization_config") {
            None | Some(Value::Null) => WeightFormat::Master,
            Some(q) => {
                let method = q.get("quant_method").and_then(Value::as_str);
                if method.is_some_and(|m| m != "bitnet") {
                    return Err(Error::Config(format!(
                        "quant_method `{}` is not bitnet",
                        method.unwrap_or_default()
                    )));
                }
                let class = q
                    .get("linear_class")
                    .and_then(Value::as_str)
                    .unwrap_or("bitlinear");
                let mode = q
                    .get("quantization_mode")
                    .and_then(Value::as_str)
                    .unwrap_or("offline");
                match (class, mode) {
                    (_, "online") => WeightFormat::Master,
                    ("bitlinear", "offline") => WeightFormat::PackedInverseScale,
                    ("autobitlinear", "offline") => WeightFormat::PackedDirectScale,
                    (c, m) => {
                        return Err(Error::Config(format!(
                            "unknown quantization_config linear_class `{c}` / mode `{m}`"
                        )))
                    }
                }
            }
        };
        let cfg = ModelConfig {
            hidden_size,
            intermediate_size: require_usize(v, "intermediate_size")?,
            num_layers: require_usize(v, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: require_usize(v, "vocab_size")?,
            rms_norm_eps: get_f32(v, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            max_position_embeddings: get_usize(v, "max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            activation,
            weight_format,
            bos_token_id: token_ids(v, "bos_token_id")?.first().copied(),
            eos_token_ids: token_ids(v, "eos_token_id")?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Takes BOS/EOS from a `generation_config.json`, which transformers prefers over the
    /// model config when generating.
    pub fn apply_generation_config(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        if let Some(b) = token_ids(&v, "bos_token_id")?.first() {
            self.bos_token_id = Some(*b);
        }
        let eos = token_ids(&v, "eos_token_id")?;
        if !eos.is_empty() {
            self.eos_token_ids = eos;
        }
        Ok(())
    }

    /// Checks that the sizes are positive and consistent with each other.
    pub fn validate(&self) -> Result<()> {
        let sizes = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in sizes {
            if v == 0 {
                return Err(Error::Config(format!("`{name}` must be positive")));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(Error::Config(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::Config(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim
            )));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(Error::Config(
                "`rms_norm_eps` must be a finite non-negative number".into(),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(Error::Config(
                "`rope_theta` must be a positive number".into(),
            ));
        }
        for &id in self.bos_token_id.iter().chain(&self.eos_token_ids) {
            if id as usize >= self.vocab_size {
                return Err(Error::Config(format!(
                    "special token id {id} is outside the vocabulary of {}",
                    self.vocab_size
                )));
            }
        }
        Ok(())
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
            "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
            "hidden_act": "relu2", "bos_token_id": 510, "eos_token_id": [511, 3],
            "quantization_config": {"quant_method": "bitnet", "linear_class": "bitlinear",
                                    "quantization_mode": "offline"}
        })
    }

    #[test]
    fn parses_the_fixture_shape() {
        let c = ModelConfig::from_hf_json(&base()).unwrap();
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.weight_format, WeightFormat::PackedInverseScale);
        assert_eq!(c.eos_token_ids, vec![511, 3]);
        assert_eq!(c.bos_token_id, Some(510));
        assert_eq!(c.activation, Activation::Relu2);
    }

    #[test]
    fn rejects_inconsistent_heads() {
        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        let e = ModelConfig::from_hf_json(&v).unwrap_err().to_string();
        assert!(e.contains("not a multiple"), "{e}");
        let mut v = base();
        v["num_attention_heads"] = json!(3);
        v["num_key_value_heads"] = json!(3);
        let e = ModelConfig::from_hf_json(&v).unwrap_err().to_string();
        assert!(e.contains("not divisible"), "{e}");
        let mut v = base();
        v["vocab_size"] = json!(100);
        assert!(ModelConfig::from_hf_json(&v).is_err());
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = ModelConfig::from_hf_json(&v).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
    }

    #[test]
    fn quantization_variants() {
        let mut v = base();
        v["quantization_config"]["linear_class"] = json!("autobitlinear");
        assert_eq!(
            ModelConfig::from_hf_json(&v).unwrap().weight_format,
            WeightFormat::PackedDirectScale
        );
        v["quantization_config"]["quantization_mode"] = json!("online");
        assert_eq!(
            ModelConfig::from_hf_json(&v).unwrap().weight_format,
            WeightFormat::Master
        );
        v["rope_scaling"] = json!({"rope_type": "llama3"});
        assert!(ModelConfig::from_hf_json(&v).is_err());
    }
}
