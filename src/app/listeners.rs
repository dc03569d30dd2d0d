//! The two listeners (gRPC over TLS, HTTP probes/metrics): bound first, served until shutdown,
//! drained within the drain deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use super::AppError;
use crate::proto::IstioCertificateServiceServer;
use crate::server::{
    CaService, ConnectionGuard, GrpcServices, GuardedListener, HTTP_MAX_CONNECTIONS, Readiness,
    Refusals, RequestLimits, ServerLimits, accept_tls, drain_deadline, http_router,
};
use crate::telemetry::ServerMetrics;

/// How long after the drain deadline the server stops waiting for connections to close.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// The bound listeners.
#[derive(Debug)]
pub(super) struct Listeners {
    grpc: TcpListener,
    http: TcpListener,
    /// The bound gRPC address (useful with port 0).
    pub grpc_addr: SocketAddr,
    /// The bound HTTP address.
    pub http_addr: SocketAddr,
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), AppError> {
    let bind_err = |source| AppError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
    let bound = listener.local_addr().map_err(bind_err)?;
    Ok((listener, bound))
}

/// What the two servers serve.
pub(super) struct Services {
    /// The CreateCertificate service.
    pub ca: CaService,
    /// The serving TLS configuration of the gRPC listener.
    pub tls: Arc<rustls::ServerConfig>,
    /// `/readyz`: set once both servers run, cleared at shutdown.
    pub readiness: Readiness,
    /// Rendered on `/metrics`; the transport refusals are registered in it.
    pub metrics: ServerMetrics,
    /// The signer's name, for the "ready" line.
    pub signer: &'static str,
}

/// Resolves once `shutdown` turns true (or its sender is gone).
async fn stopped(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

impl Listeners {
    /// Binds the gRPC and the HTTP listener.
    pub async fn bind(grpc: SocketAddr, http: SocketAddr) -> Result<Self, AppError> {
        let (grpc, grpc_addr) = bind(grpc).await?;
        let (http, http_addr) = bind(http).await?;
        Ok(Self {
            grpc,
            http,
            grpc_addr,
            http_addr,
        })
    }

    /// Serves gRPC and HTTP until `shutdown`, then drains: connections still open at the drain
    /// deadline are closed (`ConnectionGuard`), and should a server still not have returned a
    /// moment later, it stops waiting for it.
    pub async fn serve(
        self,
        services: Services,
        limits: ServerLimits,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), AppError> {
        let refusals = Refusals::register(&services.metrics);
        let (grpc_guard, http_guard) = guards(&limits, &refusals, &shutdown);
        let (conn_tx, conn_rx) = mpsc::channel(256);
        let accept = tokio::spawn(accept_tls(
            self.grpc,
            TlsAcceptor::from(services.tls),
            grpc_guard,
            limits.handshake_timeout,
            conn_tx,
            shutdown.clone(),
        ));
        let ca = IstioCertificateServiceServer::new(services.ca)
            .max_decoding_message_size(limits.max_message_size);
        let grpc_services = GrpcServices::new(ca, health_service().await);
        let grpc = tonic::transport::Server::builder()
            .max_concurrent_streams(limits.max_concurrent_streams)
            .http2_max_header_list_size(limits.max_header_list_size)
            .http2_keepalive_interval(Some(limits.keepalive_interval))
            .http2_keepalive_timeout(Some(limits.keepalive_timeout))
            .serve_with_incoming_shutdown(
                RequestLimits::new(grpc_services, &limits, refusals),
                ReceiverStream::new(conn_rx),
                stopped(shutdown.clone()),
            );
        let metrics = services.metrics;
        let router = http_router(
            services.readiness.clone(),
            Arc::new(move || metrics.encode()),
        );
        let http = axum::serve(GuardedListener::new(self.http, http_guard), router)
            .with_graceful_shutdown(stopped(shutdown.clone()));
        services.readiness.set(true);
        let (grpc_addr, http_addr) = (self.grpc_addr, self.http_addr);
        tracing::info!(%grpc_addr, %http_addr, signer = services.signer, "meshid server ready");
        let not_ready = stopped(shutdown.clone());
        let readiness = services.readiness;
        tokio::spawn(async move {
            not_ready.await;
            readiness.set(false);
        });
        let served = async { tokio::join!(grpc, http.into_future()) };
        let (grpc_res, http_res) = tokio::select! {
            served = served => served,
            _ = async {
                stopped(shutdown).await;
                tokio::time::sleep(limits.drain_deadline + DRAIN_GRACE).await;
            } => {
                tracing::warn!("servers still busy after the drain deadline; stopping anyway");
                (Ok(()), Ok(()))
            }
        };
        accept.abort();
        grpc_res.map_err(|e| AppError::Serve(e.to_string()))?;
        http_res.map_err(|e| AppError::Serve(e.to_string()))
    }
}

/// The connection guards of the gRPC and the HTTP listener, closing what is still open
/// `--drain-deadline` after shutdown.
fn guards(
    limits: &ServerLimits,
    refusals: &Refusals,
    shutdown: &watch::Receiver<bool>,
) -> (ConnectionGuard, ConnectionGuard) {
    let hard_stop = drain_deadline(shutdown.clone(), limits.drain_deadline);
    let grpc = ConnectionGuard::new(
        limits.max_connections,
        limits.idle_timeout,
        hard_stop.clone(),
        refusals.clone(),
    );
    let http = ConnectionGuard::new(
        HTTP_MAX_CONNECTIONS,
        limits.idle_timeout,
        hard_stop,
        refusals.for_listener("http"),
    );
    (grpc, http)
}

/// The gRPC health service, reporting the CA service as serving.
async fn health_service() -> HealthServer<HealthService> {
    let reporter = HealthReporter::new();
    reporter
        .set_serving::<IstioCertificateServiceServer<CaService>>()
        .await;
    HealthServer::new(HealthService::from_health_reporter(reporter))
}
