//! The gRPC services of the CA endpoint, dispatched by path prefix.
//!
//! tonic's general `Routes` puts every request through an axum router (a path match, URL
//! parameters stored in the request, and several boxed service layers). This endpoint serves two
//! services, so one prefix comparison picks the service instead. Each generated service answers
//! `UNIMPLEMENTED` for a method it does not have, and a path of no service goes to the CA service
//! for that answer.

use std::convert::Infallible;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service};

use super::CaService;
use crate::proto::IstioCertificateServiceServer;

/// The path prefix of the gRPC health service.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// The CA service and the gRPC health service `H`, as one tower service for tonic's server.
#[derive(Clone)]
pub struct GrpcServices<H> {
    ca: IstioCertificateServiceServer<CaService>,
    health: H,
}

impl<H> GrpcServices<H> {
    /// Serves `ca`, and `health` under `/grpc.health.v1.Health/`.
    pub fn new(ca: IstioCertificateServiceServer<CaService>, health: H) -> Self {
        Self { ca, health }
    }
}

type GrpcResponse = http::Response<Body>;

impl<H> Service<http::Request<Body>> for GrpcServices<H>
where
    H: Service<
            http::Request<Body>,
            Response = GrpcResponse,
            Error = Infallible,
            Future = BoxFuture<GrpcResponse, Infallible>,
        >,
{
    type Response = GrpcResponse;
    type Error = Infallible;
    type Future = BoxFuture<GrpcResponse, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Both generated services are always ready; ask them anyway, so that stays their call.
        match (
            Service::<http::Request<Body>>::poll_ready(&mut self.ca, cx),
            self.health.poll_ready(cx),
        ) {
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path().starts_with(HEALTH_PREFIX) {
            self.health.call(req)
        } else {
            self.ca.call(req)
        }
    }
}
