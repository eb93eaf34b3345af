//! A private 3-node NATS JetStream cluster on loopback: three `nats-server`
//! processes (2.9) with routes between them, each on its own free client
//! and route port and its own store, that a test can kill and start again
//! one node at a time. `scripts/cluster.sh` starts the same cluster by hand.
//!
//! The nodes do not advertise client URLs (`no_advertise`): a client knows
//! the servers of its seed list and no others, so one given a single node
//! is cut off when that node dies, as a service behind a partition is.

use std::time::Duration;

use async_nats::jetstream;

use crate::{PrivateNats, TestEnv, eventually};

/// How long a cluster may take to elect leaders after a change.
const ELECTION: Duration = Duration::from_secs(60);

pub struct PrivateCluster {
    nodes: Vec<PrivateNats>,
}

impl PrivateCluster {
    /// Starts three nodes (`n0`, `n1`, `n2`) and waits until JetStream
    /// answers on every one (the cluster has a meta leader).
    pub async fn start() -> PrivateCluster {
        // Ports picked free may be taken by a test beside this one before a
        // node binds them: the node exits, and the cluster is started again
        // on other ports.
        let mut tries = Vec::new();
        let nodes = loop {
            match PrivateCluster::try_nodes() {
                Ok(nodes) => break nodes,
                Err(why) if tries.len() < 4 => tries.push(why),
                Err(why) => panic!("the cluster did not start: {}; {why}", tries.join("; ")),
            }
        };
        let cluster = PrivateCluster { nodes };
        for i in 0..3 {
            cluster.wait_jetstream(i).await;
        }
        cluster
    }

    fn try_nodes() -> Result<Vec<PrivateNats>, String> {
        let route_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        (0..3)
            .map(|i| {
                let routes: Vec<String> = route_ports
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, port)| format!("\"nats-route://127.0.0.1:{port}\""))
                    .collect();
                PrivateNats::try_start_with_config(&format!(
                    "server_name: \"n{i}\"\n\
                     cluster {{\n  name: \"corral-test\"\n  listen: \"127.0.0.1:{}\"\n  \
                     no_advertise: true\n  routes: [{}]\n}}\n",
                    route_ports[i],
                    routes.join(", ")
                ))
            })
            .collect()
    }

    /// The seed list: every node, comma-separated.
    pub fn urls(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `i` alone.
    pub fn url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    /// What node `i` logged.
    pub fn log(&self, i: usize) -> String {
        self.nodes[i].log()
    }

    /// SIGKILLs node `i`, as a crash or a lost machine would.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Starts node `i` again on its store; it catches up from the others.
    pub async fn start_again(&mut self, i: usize) {
        self.nodes[i].start_again();
        self.wait_jetstream(i).await;
    }

    /// The node a server name (`n<i>`) stands for.
    pub fn index(&self, server_name: &str) -> usize {
        server_name
            .strip_prefix('n')
            .and_then(|i| i.parse().ok())
            .filter(|i| *i < self.nodes.len())
            .unwrap_or_else(|| panic!("{server_name:?} is not a node of this cluster"))
    }

    /// A JetStream context on the whole cluster.
    pub async fn jetstream(&self) -> jetstream::Context {
        let client = async_nats::ConnectOptions::new()
            .name("corral-test-cluster")
            .connect(corral_common::nats::seeds(&self.urls()).expect("the seed list"))
            .await
            .expect("the cluster should accept a client");
        jetstream::new(client)
    }

    /// The node that leads `stream` (after an election, if one is under way).
    pub async fn leader(&self, js: &jetstream::Context, stream: &str) -> usize {
        let name = eventually(
            &format!("stream {stream} has a leader"),
            ELECTION,
            || async {
                let mut stream = js.get_stream(stream).await.ok()?;
                let info = stream.info().await.ok()?;
                info.cluster.as_ref()?.leader.clone()
            },
        )
        .await;
        self.index(&name)
    }

    /// Makes node `to` the leader of `stream`: asks the leader to step down
    /// until the election lands there.
    pub async fn move_leader(&self, js: &jetstream::Context, stream: &str, to: usize) {
        for _ in 0..40 {
            if self.leader(js, stream).await == to {
                return;
            }
            // The next leader is elected among the others; `leader` waits
            // for it.
            let _ = js
                .client()
                .request(
                    format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}"),
                    "".into(),
                )
                .await;
        }
        panic!("stream {stream} never elected n{to} in 40 step-downs");
    }

    /// Waits until every replica of `stream` is current: none offline,
    /// none lagging.
    pub async fn wait_current(&self, js: &jetstream::Context, stream: &str) {
        eventually(
            &format!("every replica of {stream} is current"),
            ELECTION,
            || async {
                let mut stream = js.get_stream(stream).await.ok()?;
                let info = stream.info().await.ok()?;
                let cluster = info.cluster.as_ref()?;
                cluster.leader.as_ref()?;
                (cluster.replicas.len() == self.nodes.len() - 1
                    && cluster
                        .replicas
                        .iter()
                        .all(|r| r.current && !r.offline && r.lag.unwrap_or(0) == 0))
                .then_some(())
            },
        )
        .await;
    }

    async fn wait_jetstream(&self, i: usize) {
        let url = self.url(i);
        eventually(
            &format!("JetStream answers on node n{i} ({url})"),
            ELECTION,
            || async {
                // `$JS.API.INFO` answers with an error until the cluster
                // has a metadata leader.
                let client = async_nats::connect(url.as_str()).await.ok()?;
                let reply = client.request("$JS.API.INFO", "".into()).await.ok()?;
                let info: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
                info.get("error").is_none().then_some(())
            },
        )
        .await;
    }
}

impl TestEnv {
    /// A test environment on `cluster`: services get its seed list and
    /// keep three copies of every stream.
    pub async fn on_cluster(cluster: &PrivateCluster) -> TestEnv {
        let mut env = TestEnv::with_nats(&cluster.urls()).await;
        env.streams = corral_common::streams::Streams::replicated(3);
        env
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}
