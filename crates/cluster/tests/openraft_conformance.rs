//! openraft's own storage conformance suite, run against the node log (one group of a real
//! node-wide log on disk) and the group state machine.

use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;
use starcite_cluster::log_store::{GroupLogStore, NodeLog};
use starcite_cluster::state_machine::{GroupShared, GroupStateMachine};
use starcite_cluster::types::TypeConfig;

struct Builder;

impl StoreBuilder<TypeConfig, GroupLogStore, GroupStateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, GroupLogStore, GroupStateMachine), StorageError<TypeConfig>>
    {
        let dir = tempfile::tempdir().expect("temp dir");
        // Several groups share the log; the suite drives group 2 while the others stay idle.
        let (log, _) = NodeLog::open(&dir.path().join("log"), 4, 64 * 1024).expect("log opens");
        let shared = GroupShared::new(2, 10_000);
        let sm = GroupStateMachine::new(shared, dir.path().join("g2.snap"), 10_000);
        Ok((dir, log.store(2), sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_log_passes_the_openraft_storage_suite() {
    Suite::test_all(Builder).await.expect("conformance suite");
}
