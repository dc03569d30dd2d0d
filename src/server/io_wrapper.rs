//! What the connection wrappers between HTTP/2 and TLS ([`CoalescingIo`](super::CoalescingIo),
//! [`RefusalWatch`](super::RefusalWatch)) pass through unchanged: reads and the peer's
//! connection info. Each wrapper writes only its own `AsyncWrite`.

/// Implements `tonic`'s `Connected` and tokio's `AsyncRead` for `$wrapper<T>` by delegating to
/// its `inner: T` field.
macro_rules! pass_reads_through {
    ($wrapper:ident) => {
        impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected
            for $wrapper<T>
        {
            type ConnectInfo = T::ConnectInfo;

            fn connect_info(&self) -> Self::ConnectInfo {
                self.inner.connect_info()
            }
        }

        impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for $wrapper<T> {
            fn poll_read(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
            }
        }
    };
}

pub(super) use pass_reads_through;
