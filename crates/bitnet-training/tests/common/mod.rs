//! Helpers shared by the integration tests: a small corpus, the tiny configuration, run
//! options and `log.csv` reading.

// Each test binary uses a different subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use bitnet_training::config::TrainConfig;
use bitnet_training::train::TrainOptions;

/// Twenty varied sentences, about 1.5 KB (written for these tests).
pub const SENTENCES: &str = "\
The lighthouse keeper counted seven ships before the fog rolled in from the west.
A quiet river bends twice around the old mill and then runs straight to the sea.
Maria planted tomatoes, beans and a single sunflower that grew taller than the fence.
Every winter the village bakes bread in the shared oven next to the church.
The train to the mountains leaves at nine, but the conductor is always late.
Two foxes watched the farmer close the gate and waited for the moon to rise.
Numbers like 17, 42 and 1024 appear in the notebook without any explanation.
His grandmother kept letters in a tin box painted with blue and yellow birds.
When the storm ended, the children ran outside to measure the puddles with sticks.
A good soup needs patience, salt, and an onion cut into very thin slices.
The museum closed early because a pipe burst above the gallery of maps.
She solved the puzzle on the back of a receipt while waiting for the bus.
Copper turns green in the rain, and the roof of the station is almost emerald now.
Nobody remembered who had left the violin on the bench by the harbour.
The recipe says to stir the sauce slowly for twenty minutes without stopping.
Owls hunt at night; their feathers are soft, so their flight makes almost no sound.
In the spring the market sells radishes, cheese, honey and hand-carved spoons.
The engineer drew the bridge three times before the numbers finally agreed.
Snow covered the tracks, so the postman delivered the parcels on skis.
They argued about the map for an hour and then discovered it was upside down.
";

/// The `tiny` preset with `steps` steps and no periodic validation or checkpoints (tests set
/// what they need).
pub fn tiny(steps: u64) -> TrainConfig {
    let mut cfg = TrainConfig::preset("tiny").expect("tiny preset");
    cfg.recipe.steps = steps;
    cfg.recipe.eval_every = 0;
    cfg.recipe.checkpoint_every = 0;
    cfg
}

/// Writes `text` to `dir/name`.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write a test file");
    p
}

/// Options for a quiet run in `out`.
pub fn options(out: &Path, resume: bool, stop_after: Option<u64>, log_every: u64) -> TrainOptions {
    TrainOptions {
        out_dir: out.to_path_buf(),
        resume,
        progress: false,
        stop_after,
        log_every,
    }
}

/// The rows of a `log.csv` (header checked and dropped), split into fields.
pub fn log_rows(out: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(out.join("log.csv")).expect("log.csv");
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("step,tokens,lr,weight_decay,train_loss,grad_norm,val_loss,val_nats_per_byte,train_seconds")
    );
    lines
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}
