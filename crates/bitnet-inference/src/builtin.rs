//! The built-in model: a small BitNet b1.58 model trained by this project on Shakespeare's
//! plays and the King James Bible (`models/builtin/README.md` says how), compiled into the
//! library so that `bitnet generate` produces text with no download and no model file.

use bitnet_core::MappedFile;

use crate::formats::gguf::GgufFile;
use crate::loader::{load_gguf, LoadOptions, LoadedModel};
use crate::Result;

/// Storage with the alignment a page-aligned file map gives, so that weights can be borrowed
/// in place exactly as from a mapped GGUF file.
#[repr(C, align(4096))]
struct PageAligned<B: ?Sized>(B);

static MODEL: &PageAligned<[u8]> = &PageAligned(*include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../models/builtin/bitnet-b1.58-bard-3.7m.gguf"
)));

/// The name the built-in model goes by in messages and `--model builtin`.
pub const BUILTIN_NAME: &str = "builtin";

/// The built-in model's GGUF bytes.
pub fn builtin_bytes() -> &'static [u8] {
    &MODEL.0
}

/// Loads the built-in model.
pub fn load_builtin(opts: &LoadOptions) -> Result<LoadedModel> {
    let file = MappedFile::from_static("<built-in model>", builtin_bytes());
    load_gguf(GgufFile::parse(file)?, opts)
}
