//! The Lua scripts: each a shared prelude and its own file under `src/lua/`, loaded once.

use std::sync::LazyLock;

use redis::Script;

macro_rules! script {
    ($name:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("../lua/prelude.lua"),
                include_str!(concat!("../lua/", $name, ".lua"))
            ))
        })
    };
}

pub(super) static CLAIM: LazyLock<Script> = script!("claim");
pub(super) static COMPLETE: LazyLock<Script> = script!("complete");
pub(super) static RELEASE: LazyLock<Script> = script!("release");
pub(super) static RENEW: LazyLock<Script> = script!("renew");
pub(super) static HELD: LazyLock<Script> = script!("held");
pub(super) static INSPECT: LazyLock<Script> = script!("inspect");
pub(super) static EVICT: LazyLock<Script> = script!("evict");

/// The Lua source of the scripts, by name, for review and for tests: `claim`, `complete`,
/// `release`, `renew`, `held`, `inspect` and `evict`, each with the shared prelude in front.
pub fn script_sources() -> [(&'static str, &'static str); 7] {
    macro_rules! source {
        ($name:literal) => {
            (
                $name,
                concat!(
                    include_str!("../lua/prelude.lua"),
                    include_str!(concat!("../lua/", $name, ".lua"))
                ),
            )
        };
    }
    [
        source!("claim"),
        source!("complete"),
        source!("release"),
        source!("renew"),
        source!("held"),
        source!("inspect"),
        source!("evict"),
    ]
}
