//! The clusters one meshid serves: its own (`--cluster-id`, reached with its own kubeconfig or
//! in-cluster configuration), and remote ones registered by Istio's remote Secrets (watched, so
//! adding, changing and deleting one takes effect without a restart) or by kubeconfig files.
//!
//! Consumers read the current [`ClusterSet`] (a caller's `clusterid` header selects the
//! cluster its token is reviewed in) or subscribe to its changes (root distribution runs one
//! controller per cluster). A remote whose kubeconfig is unusable or whose apiserver does not
//! answer is reported (log line, `meshid_remote_cluster_ready{cluster}`, `/readyz` detail) and
//! never affects the other clusters.

mod kubeconfig;
mod registry;
mod remote_secrets;

pub use kubeconfig::KubeconfigError;
pub use registry::{
    Cluster, ClusterLabels, ClusterRegistry, ClusterSet, RemoteState, UnknownCluster,
};
pub use remote_secrets::{CLUSTER_ANNOTATION, MULTICLUSTER_LABEL, watch_remote_secrets};
