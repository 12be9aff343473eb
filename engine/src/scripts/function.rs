//! lua/reserve.lua as a Redis Function (`FCALL`) rather than a script (`EVALSHA`).
//!
//! A script runs its whole text on every call: the preludes (clock.lua, lib.lua) make their ≈ 20
//! closures and the key table each time, and the garbage collector frees them again — ≈ 8 % of a
//! reserve's Redis CPU (docs/BENCHMARKS.md, reserve script cost). A function library runs its
//! text once, when loaded; each call then runs only the function. Reserve is the hottest script,
//! so it alone is a function; the others stay scripts (docs/ARCHITECTURE.md, Choices).
//!
//! The library and its one function are named by the SHA-1 of the library's code, so instances of
//! two releases (and the model test, with its own clock) each load and call their own, side by
//! side, and never replace each other's. Functions live in Redis' AOF and are copied to replicas;
//! a node that has none (a restart without persistence, a new node) answers "Function not found"
//! and the library is loaded again, as `EVALSHA`'s `NOSCRIPT` reloads a script.

use fred::prelude::*;

use super::Reply;

/// A function library of one function: a script body with the preludes made once per load.
pub(crate) struct Function {
    /// The library's and the function's name: `floodgate_` and 16 hex digits of the code's SHA-1.
    name: String,
    code: String,
}

impl Function {
    /// `body` (a script body that reads `KEYS` and `ARGV`) after `clock` and `lib` (lib.lua, whose
    /// `name_keys` names each call's keys). `KEYS` and `ARGV` are the library's locals, set on
    /// each call from the function's arguments, so the preludes and the body read them as a
    /// script does.
    pub(crate) fn new(clock: &str, lib: &str, body: &str) -> Function {
        let inner = format!(
            "local KEYS, ARGV\n{clock}\n{lib}\nlocal function run(keys, args)\n\
             KEYS, ARGV = keys, args\nname_keys(KEYS)\n{body}\nend\n"
        );
        let sha = fred::util::sha1_hash(&inner);
        let name = format!("floodgate_{}", &sha[..16]);
        let code = format!("#!lua name={name}\n{inner}redis.register_function('{name}', run)\n");
        Function { name, code }
    }

    /// The function's name, for `FCALL` (and `redis-benchmark`).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Loads the library on the node `client` reaches (replacing a library of the same name,
    /// which is the same code).
    pub(crate) async fn load(&self, client: &Client) -> FredResult<()> {
        client
            .function_load::<Value, _>(true, self.code.clone())
            .await?;
        Ok(())
    }

    /// `FCALL`, loading the library first where the node has lost it.
    pub(crate) async fn call_with_reload(
        &self,
        client: &Client,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> FredResult<Reply> {
        match client
            .fcall::<Reply, _, _, _>(self.name.as_str(), keys.clone(), args.clone())
            .await
        {
            Err(e) if e.details().contains("Function not found") => {
                self.load(client).await?;
                client.fcall(self.name.as_str(), keys, args).await
            }
            result => result,
        }
    }
}
